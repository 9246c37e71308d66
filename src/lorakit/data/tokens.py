"""Tokenized examples held flat in numpy arrays, and their conversion to a `datasets.Dataset`."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from itertools import chain
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from lorakit.data.content import Content

IGNORE = -100
TOKEN = np.int32
ARROW_CHUNK_TOKENS = 2**31 - 1  # an Arrow list array's int32 offsets address at most this many values


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def offsets_of(lengths) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


@dataclass
class Tokens:
    """Examples held flat: example i is ids[starts[i]:ends[i]], its labels the same span of `labels`.

    Where every token is learned (text) `labels` is the very array `ids`. Taking, repeating and
    reordering examples moves only the spans; `compact` gathers them once at the end.
    """

    ids: np.ndarray
    labels: np.ndarray
    starts: np.ndarray
    ends: np.ndarray

    @classmethod
    def flat(cls, ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray) -> Tokens:
        return cls(ids, labels, offsets[:-1], offsets[1:])

    @classmethod
    def from_examples(cls, examples: list[Example]) -> Tokens:
        offsets = offsets_of([len(e.input_ids) for e in examples])
        ids = np.fromiter(chain.from_iterable(e.input_ids for e in examples), TOKEN, int(offsets[-1]))
        labels = np.fromiter(chain.from_iterable(e.labels for e in examples), TOKEN, int(offsets[-1]))
        return cls.flat(ids, labels, offsets)

    @classmethod
    def concat(cls, parts: list[Tokens]) -> Tokens:
        if len(parts) == 1:
            return parts[0]
        base = offsets_of([len(p.ids) for p in parts])[:-1]
        ids = np.concatenate([p.ids for p in parts])
        labels = ids if all(p.labels is p.ids for p in parts) else np.concatenate([p.labels for p in parts])
        starts = np.concatenate([p.starts + b for p, b in zip(parts, base, strict=True)])
        ends = np.concatenate([p.ends + b for p, b in zip(parts, base, strict=True)])
        return cls(ids, labels, starts, ends)

    def __len__(self) -> int:
        return len(self.starts)

    def take(self, index) -> Tokens:
        index = np.asarray(index, np.int64)
        return Tokens(self.ids, self.labels, self.starts[index], self.ends[index])

    def n_tokens(self) -> int:
        return int((self.ends - self.starts).sum())

    def _learned(self) -> np.ndarray:
        """learned[i]: how many of the first i labels take a loss."""
        return offsets_of(self.labels != IGNORE)

    def n_supervised(self) -> int:
        if self.labels is self.ids:  # token ids are never IGNORE
            return self.n_tokens()
        learned = self._learned()
        return int((learned[self.ends] - learned[self.starts]).sum())

    def chunk(self, block: int) -> Tokens:
        """Split examples longer than a block; drop pieces with nothing to learn."""
        counts = -(-(self.ends - self.starts) // block)
        owner = np.repeat(np.arange(len(self)), counts)
        nth = np.arange(len(owner)) - np.repeat(np.cumsum(counts) - counts, counts)
        starts = self.starts[owner] + nth * block
        ends = np.minimum(starts + block, self.ends[owner])
        # A piece must have a label after its first token: a causal LM never predicts its first token.
        if self.labels is self.ids:
            keep = ends - starts > 1
        else:
            learned = self._learned()
            keep = learned[ends] > learned[np.minimum(starts + 1, ends)]
        return Tokens(self.ids, self.labels, starts[keep], ends[keep])

    def compact(self) -> Tokens:
        """The same examples laid out back to back in fresh arrays (no copy if they already are)."""
        offsets = offsets_of(self.ends - self.starts)
        if len(self.ids) == offsets[-1] and np.array_equal(self.starts, offsets[:-1]):
            return Tokens.flat(self.ids, self.labels, offsets)
        spans = list(zip(self.starts.tolist(), self.ends.tolist(), strict=True))
        ids = np.concatenate([self.ids[s:e] for s, e in spans] or [self.ids[:0]])
        labels = ids if self.labels is self.ids else np.concatenate([self.labels[s:e] for s, e in spans] or [ids])
        return Tokens.flat(ids, labels, offsets)

    def examples(self) -> list[Example]:
        return [
            Example(self.ids[s:e].tolist(), self.labels[s:e].tolist())
            for s, e in zip(self.starts.tolist(), self.ends.tolist(), strict=True)
        ]


def _list_column(values: np.ndarray, offsets: np.ndarray, dtype):
    """A list<dtype> Arrow column, in chunks whose int32 offsets cannot overflow."""
    import pyarrow as pa

    cuts = [0]
    while cuts[-1] < len(offsets) - 1:
        fits = int(np.searchsorted(offsets, offsets[cuts[-1]] + ARROW_CHUNK_TOKENS, side="right")) - 1
        cuts.append(max(cuts[-1] + 1, fits))
    chunks = [
        pa.ListArray.from_arrays(
            pa.array((offsets[a : b + 1] - offsets[a]).astype(np.int32)),
            pa.array(values[offsets[a] : offsets[b]].astype(dtype, copy=False)),
        )
        for a, b in zip(cuts[:-1], cuts[1:], strict=True)
    ]
    return pa.chunked_array(chunks, type=pa.list_(pa.from_numpy_dtype(dtype)))


def to_dataset(tokens: Tokens, fingerprint: str):
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable

    flat = tokens.compact()
    offsets = offsets_of(flat.ends - flat.starts)
    # The column types `Dataset.from_dict` gives lists of ints: input_ids int32, labels int64.
    table = pa.table(
        {"input_ids": _list_column(flat.ids, offsets, np.int32), "labels": _list_column(flat.labels, offsets, np.int64)}
    )
    # A fingerprint given spares `datasets` hashing every token to make one.
    return Dataset(InMemoryTable(table), fingerprint=fingerprint)


@dataclass
class Prepared:
    """Train and eval examples, the report kept in the adapter's metadata, and whether the cache gave them.

    `train` / `eval` build lists of `Example` (for small data and tests); training reads `datasets()`.
    """

    train_set: Tokens
    eval_set: Tokens
    report: dict[str, Any] = field(default_factory=dict)
    cache: str = "off"  # "hit", "stored", "off", or why it could not be stored
    cache_key: str | None = None
    seconds: float = 0.0
    content: Content | None = None  # digests and hash of the data files and settings these were made from

    @property
    def train(self) -> list[Example]:
        return self.train_set.examples()

    @property
    def eval(self) -> list[Example]:
        return self.eval_set.examples()

    def datasets(self):
        from datasets.fingerprint import generate_random_fingerprint

        tag = self.cache_key or generate_random_fingerprint()
        train = to_dataset(self.train_set, hashlib.sha256(f"{tag}:train".encode()).hexdigest()[:32])
        if not len(self.eval_set):
            return train, None
        return train, to_dataset(self.eval_set, hashlib.sha256(f"{tag}:eval".encode()).hexdigest()[:32])

    def origin(self) -> str:
        """Where this data came from, for the run log."""
        if self.cache == "hit":
            return f"cached (key {self.cache_key[:12]}, loaded in {self.seconds:.1f} s)"
        if self.cache == "stored":
            return f"prepared in {self.seconds:.1f} s (cached as key {self.cache_key[:12]})"
        if self.cache == "off":
            return f"prepared in {self.seconds:.1f} s (data.cache is off)"
        return f"prepared in {self.seconds:.1f} s (not cached: {self.cache})"
