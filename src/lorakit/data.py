"""Training data: sources -> records -> formatted, tokenized examples with loss masks.

Every example is a list of token ids and a list of labels (-100 where no loss is taken),
ending with the end-of-sequence token so the model learns to stop. SFTTrainer then packs
them into `block_size` blocks. Examples are held flat in numpy arrays (`Tokens`), and the
prepared data is cached on disk under a key of everything it depends on: a rerun loads it.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.errors import LorakitError
from lorakit.recipe import DataSection, DataSource

log = logging.getLogger("lorakit")

TEXT_SUFFIXES = {".txt", ".md"}
TABLE_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet"}
IGNORE = -100
MIN_DOCS_FOR_DOC_SPLIT = 5
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
TOKEN = np.int32
# Bump when prepare() gives different examples for the same inputs: older cache entries then stop matching.
DATA_FORMAT = 1
ENCODE_BATCH_CHARS = 1 << 20  # text per batched tokenizer call: bounds the tokenizer's per-token objects
PARALLELISM = "TOKENIZERS_PARALLELISM"
ARROW_CHUNK_TOKENS = 2**31 - 1  # an Arrow list array's int32 offsets address at most this many values
_PID = os.getpid()


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def _offsets(lengths) -> np.ndarray:
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
        offsets = _offsets([len(e.input_ids) for e in examples])
        ids = np.fromiter(chain.from_iterable(e.input_ids for e in examples), TOKEN, int(offsets[-1]))
        labels = np.fromiter(chain.from_iterable(e.labels for e in examples), TOKEN, int(offsets[-1]))
        return cls.flat(ids, labels, offsets)

    @classmethod
    def concat(cls, parts: list[Tokens]) -> Tokens:
        if len(parts) == 1:
            return parts[0]
        base = _offsets([len(p.ids) for p in parts])[:-1]
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
        return _offsets(self.labels != IGNORE)

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
        offsets = _offsets(self.ends - self.starts)
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


def _dataset(tokens: Tokens, fingerprint: str):
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable

    flat = tokens.compact()
    offsets = _offsets(flat.ends - flat.starts)
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

    @property
    def train(self) -> list[Example]:
        return self.train_set.examples()

    @property
    def eval(self) -> list[Example]:
        return self.eval_set.examples()

    def datasets(self):
        from datasets.fingerprint import generate_random_fingerprint

        tag = self.cache_key or generate_random_fingerprint()
        train = _dataset(self.train_set, hashlib.sha256(f"{tag}:train".encode()).hexdigest()[:32])
        if not len(self.eval_set):
            return train, None
        return train, _dataset(self.eval_set, hashlib.sha256(f"{tag}:eval".encode()).hexdigest()[:32])

    def origin(self) -> str:
        """Where this data came from, for the run log."""
        if self.cache == "hit":
            return f"cached (key {self.cache_key[:12]}, loaded in {self.seconds:.1f} s)"
        if self.cache == "stored":
            return f"prepared in {self.seconds:.1f} s (cached as key {self.cache_key[:12]})"
        if self.cache == "off":
            return f"prepared in {self.seconds:.1f} s (data.cache is off)"
        return f"prepared in {self.seconds:.1f} s (not cached: {self.cache})"


# --- reading ----------------------------------------------------------------------------------


def source_files(path: Path) -> list[Path]:
    if not path.exists():
        raise LorakitError(f"data source not found: {path}")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES | TABLE_SUFFIXES)
    if not files:
        raise LorakitError(
            f"{path}: no data files in this folder (looked for {', '.join(sorted(TEXT_SUFFIXES | TABLE_SUFFIXES))})"
        )
    return files


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise LorakitError(
            f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at line {line}, offset {e.start}); "
            "convert it, e.g. `iconv -f latin1 -t utf-8`"
        ) from None


def _split_text(text: str, split: str) -> list[str]:
    if split == "file":
        parts = [text]
    elif split == "paragraph":
        parts = re.split(r"\n[ \t\r]*\n", text.replace("\r\n", "\n"))
    else:
        parts = text.splitlines()
    return [p.strip() for p in parts if p.strip()]


def _read_table(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix
    if suffix == ".jsonl":
        rows = []
        # Split on newlines only: JSON strings may hold U+2028 and friends, which splitlines() breaks at.
        for i, line in enumerate(_read_text(path).split("\n"), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LorakitError(f"{path}: line {i} is not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict):
                raise LorakitError(f"{path}: line {i} is a {type(row).__name__}, expected a JSON object")
            rows.append(row)
        return rows
    if suffix == ".json":
        try:
            data = json.loads(_read_text(path))
        except json.JSONDecodeError as e:
            raise LorakitError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise LorakitError(f'{path}: expected a JSON list of objects (or {{"data": [...]}})')
        return data
    if suffix == ".csv":
        try:
            return list(csv.DictReader(io.StringIO(_read_text(path), newline="")))
        except csv.Error as e:
            raise LorakitError(f"{path}: cannot read CSV: {e}") from None
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise LorakitError(f"{path}: cannot read parquet: {e}") from None


def _field(row: dict, name: str, path: Path, index: int) -> Any:
    if name not in row:
        raise LorakitError(
            f"{path}: row {index + 1} has no field {name!r} (fields: {', '.join(map(str, row)) or 'none'}); "
            "set `field:` on this source"
        )
    if row[name] is None:
        raise LorakitError(f"{path}: row {index + 1}: field {name!r} is empty (null)")
    return row[name]


def read_records(src: DataSource) -> list[dict[str, Any]]:
    """Read one source into records shaped for its format."""
    path = Path(src.path)
    if _is_saved_dataset(path):
        from datasets import load_from_disk

        ds = load_from_disk(str(path))
        rows = list(ds["train"] if hasattr(ds, "keys") and "train" in ds else ds)
        return _shape(rows, src, path)
    records: list[dict[str, Any]] = []
    for f in source_files(path):
        if f.suffix in TEXT_SUFFIXES:
            if src.format != "text":
                raise LorakitError(f"{f}: format {src.format!r} needs a table file (.jsonl/.json/.csv/.parquet)")
            records += [{"text": t} for t in _split_text(_read_text(f), src.split)]
        else:
            records += _shape(_read_table(f), src, f)
    return records


def _shape(rows: list[dict], src: DataSource, path: Path) -> list[dict[str, Any]]:
    out = []
    for i, row in enumerate(rows):
        if src.format == "text":
            out.append({"text": str(_field(row, src.field or "text", path, i))})
        elif src.format == "completion":
            out.append(
                {
                    "prompt": str(_field(row, "prompt", path, i)),
                    "completion": str(_field(row, "completion", path, i)),
                }
            )
        elif src.format == "instruction":
            out.append(
                {
                    "instruction": str(_field(row, src.field or "instruction", path, i)),
                    "input": str(row.get("input") or ""),
                    "output": str(_field(row, "output", path, i)),
                }
            )
        else:
            msgs = _field(row, src.field or "messages", path, i)
            if not isinstance(msgs, list) or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in msgs
            ):
                raise LorakitError(f"{path}: row {i + 1}: messages must be a list of {{role, content}} objects")
            if not any(m["role"] == "assistant" for m in msgs):
                raise LorakitError(f"{path}: row {i + 1} has no assistant message to learn from")
            out.append({"messages": msgs})
    return out


# --- formatting and tokenizing ----------------------------------------------------------------


def prompt_style(tokenizer, formats: set[str]) -> str:
    """How prompts are wrapped at generation time: 'chat', 'alpaca' or 'raw'."""
    if formats & {"chat", "instruction"}:
        return "chat" if tokenizer.chat_template else "alpaca"
    return "raw"


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


@contextmanager
def _all_cores() -> Iterator[None]:
    """Let the Rust tokenizer encode a batch on every core, then put TOKENIZERS_PARALLELISM back.

    The library reads the variable on each call. Once it is back to what it was ("false" under the
    CLI), processes forked later (data loader workers) keep off the thread pool, which a fork does
    not copy. In a process forked after this module was loaded the inherited pool may be unusable:
    leave the setting alone there.
    """
    before = os.environ.get(PARALLELISM)
    if os.getpid() == _PID:
        os.environ[PARALLELISM] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PARALLELISM, None)
        else:
            os.environ[PARALLELISM] = before


def _backend(tokenizer):
    """The Rust tokenizer behind a fast tokenizer, set up the way `tokenizer(texts)` sets it up."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return None
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    return backend


def _batches(texts: list[str]) -> Iterator[list[str]]:
    batch, size = [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= ENCODE_BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode(tokenizer, texts: list[str], special: bool, eos: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of every text (+ `eos`), flat, and the offsets of each text's ids; one batched call per ~1 MB."""
    backend = _backend(tokenizer)
    # The Rust tokenizer straight (no offsets, no attention masks) gives the ids `tokenizer(texts)` gives,
    # unless a tokenizer class adds rules of its own in Python: checked on the first texts.
    if backend is not None and texts:
        probe = texts[:8]
        fast = [e.ids for e in backend.encode_batch_fast(probe, add_special_tokens=special)]
        backend = backend if fast == tokenizer(probe, add_special_tokens=special)["input_ids"] else None
    tail = () if eos is None else (eos,)
    parts, lengths = [], []
    with _all_cores():
        for batch in _batches(texts):
            if backend is not None:
                rows = [e.ids for e in backend.encode_batch_fast(batch, add_special_tokens=special)]
            else:
                rows = tokenizer(batch, add_special_tokens=special)["input_ids"]
            sizes = [len(r) + len(tail) for r in rows]
            flat = chain.from_iterable(chain.from_iterable((r, tail) for r in rows))
            parts.append(np.fromiter(flat, TOKEN, sum(sizes)))
            lengths += sizes
    return (np.concatenate(parts) if parts else np.zeros(0, TOKEN)), _offsets(lengths)


def _eos(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise LorakitError(
            "this tokenizer has no end-of-sequence token; set one (eos_token) in its tokenizer_config.json"
        )
    return tokenizer.eos_token_id


def text_tokens(tokenizer, texts: list[str]) -> Tokens:
    ids, offsets = encode(tokenizer, texts, special=True, eos=_eos(tokenizer))
    return Tokens.flat(ids, ids, offsets)


def tokenize_texts(tokenizer, texts: list[str]) -> list[Example]:
    return text_tokens(tokenizer, texts).examples()


def completion_tokens(tokenizer, pairs: list[tuple[str, str]]) -> Tokens:
    """Prompt (no loss) + completion + EOS for every pair, each side tokenized in one batched call."""
    p_ids, p_off = encode(tokenizer, [p for p, _ in pairs], special=True)
    c_ids, c_off = encode(tokenizer, [c for _, c in pairs], special=False, eos=_eos(tokenizer))
    p_len, c_len = np.diff(p_off), np.diff(c_off)
    offsets = _offsets(p_len + c_len)
    at_prompt = np.arange(len(p_ids)) + np.repeat(offsets[:-1] - p_off[:-1], p_len)
    at_completion = np.arange(len(c_ids)) + np.repeat(offsets[:-1] + p_len - c_off[:-1], c_len)
    ids = np.empty(offsets[-1], TOKEN)
    ids[at_prompt], ids[at_completion] = p_ids, c_ids
    labels = ids.copy()
    labels[at_prompt] = IGNORE
    return Tokens.flat(ids, labels, offsets)


def tokenize_completion(tokenizer, prompt: str, completion: str) -> Example:
    return completion_tokens(tokenizer, [(prompt, completion)]).examples()[0]


def tokenize_chat(tokenizer, messages: list[dict]) -> Example:
    """Render with the chat template; loss on assistant turns only, through their end-of-turn token."""
    render = tokenizer.apply_chat_template
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prefix = render(messages[:i], tokenize=False, add_generation_prompt=True)
        full = render(messages[: i + 1], tokenize=False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise LorakitError(
                "this chat template renders a conversation differently from its prefixes, so assistant "
                "turns cannot be located; use format: text for this data"
            )
        context = _ids(tokenizer, prefix[len(done) :], special=not done)
        answer = _ids(tokenizer, full[len(prefix) :], special=False)
        # Supervise the answer up to and including its end-of-turn token, not the whitespace after it.
        stop = _last_stop(answer, tokenizer)
        ids += context + answer
        labels += [IGNORE] * len(context) + answer[:stop] + [IGNORE] * (len(answer) - stop)
        done = full
    return Example(ids, labels)


def _last_stop(answer: list[int], tokenizer) -> int:
    stops = {tokenizer.eos_token_id}
    for i in range(len(answer) - 1, -1, -1):
        if answer[i] in stops:
            return i + 1
    return len(answer)


def format_tokens(tokenizer, records: list[dict], fmt: str) -> Tokens:
    if fmt == "text":
        return text_tokens(tokenizer, [r["text"] for r in records])
    if fmt == "completion":
        return completion_tokens(tokenizer, [(r["prompt"], r["completion"]) for r in records])
    if fmt == "chat" and not tokenizer.chat_template:
        raise LorakitError("format chat needs a tokenizer with a chat template; this model has none (use instruction)")
    if fmt == "instruction" and not tokenizer.chat_template:
        return completion_tokens(
            tokenizer, [(alpaca_prompt(r["instruction"], r["input"]), r["output"]) for r in records]
        )
    chats = [instruction_messages(r) for r in records] if fmt == "instruction" else [r["messages"] for r in records]
    return Tokens.from_examples([tokenize_chat(tokenizer, m) for m in chats])


def format_records(tokenizer, records: list[dict], fmt: str) -> list[Example]:
    return format_tokens(tokenizer, records, fmt).examples()


def instruction_messages(r: dict) -> list[dict]:
    user = r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    if input_text:
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT.format(instruction=instruction)


def chunk(examples: list[Example], block_size: int) -> list[Example]:
    """Split examples longer than a block; drop pieces with nothing to learn."""
    return Tokens.from_examples(examples).chunk(block_size).examples()


# --- mixing, splitting ------------------------------------------------------------------------


def mix(per_source: list[list], weights: list[float], rng: random.Random) -> list[list]:
    """Scale each source by its weight: whole copies plus a random share for the fraction."""
    mixed = []
    for examples, w in zip(per_source, weights, strict=True):
        whole, frac = int(w), w - int(w)
        # A positive fraction keeps at least one example: a small source never silently vanishes.
        n_frac = max(1, round(len(examples) * frac)) if frac > 0 else 0
        picked = examples * whole + rng.sample(examples, min(n_frac, len(examples)))
        mixed.append(picked)
    return mixed


def split_eval(docs: list, fraction: float, rng: random.Random) -> tuple[list, list]:
    """Hold out a random `fraction` of the items (at least one), keeping their order."""
    if fraction <= 0 or len(docs) < 2:
        return docs, []
    order = list(range(len(docs)))
    rng.shuffle(order)
    held = set(order[: max(1, round(len(docs) * fraction))])
    return [d for i, d in enumerate(docs) if i not in held], [docs[i] for i in sorted(held)]


def n_tokens(examples: list[Example]) -> int:
    return sum(len(e.input_ids) for e in examples)


# --- content hashes and the cache -------------------------------------------------------------


def content_hash(section: DataSection) -> str:
    h = hashlib.sha256()
    for src in section.sources:
        for f in source_files(Path(src.path)) if not _is_saved_dataset(Path(src.path)) else []:
            h.update(f.name.encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
        h.update(json.dumps(src.model_dump(exclude={"path"}), sort_keys=True).encode())
    return "sha256:" + h.hexdigest()


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists())


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _data_files(path: Path) -> list[tuple[str, str]]:
    """(name under `path`, sha256) of every file prepare reads from `path`; a saved dataset's files too."""
    files = sorted(f for f in path.rglob("*") if f.is_file()) if _is_saved_dataset(path) else source_files(path)
    return [(f.relative_to(path).as_posix() if f != path else f.name, _file_sha256(f)) for f in files]


def tokenizer_fingerprint(tokenizer) -> str:
    """What the tokenizer brings to prepared data: its class, vocabulary and rules, special tokens, chat template."""
    backend = _backend(tokenizer)
    facts = {
        "class": type(tokenizer).__name__,
        "chat_template": tokenizer.chat_template,
        "special_tokens": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "eos_token_id": tokenizer.eos_token_id,
        "probe": tokenizer("The keeper lit the lamp at 18:40, ½ hour early.\n")["input_ids"],
    }
    h = hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode())
    rules = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    h.update(rules.encode())
    return h.hexdigest()


def cache_key(section: DataSection, tokenizer, seed: int) -> str:
    """Everything prepared data depends on: the files' bytes, the data section, the tokenizer, the seed."""
    paths = [s.path for s in section.sources] + ([section.eval_split] if isinstance(section.eval_split, str) else [])
    facts = {
        "format": DATA_FORMAT,
        "section": section.model_dump(mode="json", exclude={"cache", "packing"}),
        "files": [_data_files(Path(p)) for p in paths],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:40]


def cache_root() -> Path:
    from lorakit.models import cache_dir

    return cache_dir() / "data"


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def save_cached(prepared: Prepared, entry: Path, key: str) -> None:
    """Write into a temporary folder, then rename it into place: readers never see a partial entry.

    Every array's sha256 is recorded, so an entry damaged later (a crash before the disk caught up,
    a bad sector) is found and rebuilt, not trusted.
    """
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:12]}-", dir=entry.parent))
    try:
        files = {}
        for part, tokens in (("train", prepared.train_set.compact()), ("eval", prepared.eval_set.compact())):
            arrays = {"ids": tokens.ids, "offsets": _offsets(tokens.ends - tokens.starts)}
            if tokens.labels is not tokens.ids:
                arrays["labels"] = tokens.labels
            for name, array in arrays.items():
                data = _npy(array)
                (tmp / f"{part}_{name}.npy").write_bytes(data)
                files[f"{part}_{name}.npy"] = hashlib.sha256(data).hexdigest()
        meta = {"format": DATA_FORMAT, "key": key, "files": files, "report": prepared.report}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if entry.exists():  # an entry that failed to load: set it aside first
            old = Path(tempfile.mkdtemp(prefix=f".old-{key[:12]}-", dir=entry.parent))
            entry.rename(old / "entry")
            shutil.rmtree(old, ignore_errors=True)
        try:
            tmp.rename(entry)
        except OSError:
            if not entry.is_dir():  # else another process stored the same entry first: keep that one
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_cached(entry: Path, key: str) -> Prepared | None:
    """The prepared data stored under `entry`, or None if it is missing, stale or damaged."""
    if not (entry / "meta.json").exists():
        return None
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if meta["format"] != DATA_FORMAT or meta["key"] != key:
            raise ValueError("written for other inputs")
        sets = {}
        for part in ("train", "eval"):
            arrays = {}
            for name in ("ids", "offsets", "labels"):
                file = f"{part}_{name}.npy"
                if file not in meta["files"]:
                    continue
                data = (entry / file).read_bytes()
                if hashlib.sha256(data).hexdigest() != meta["files"][file]:
                    raise ValueError(f"{file} does not match its checksum")
                arrays[name] = np.load(io.BytesIO(data), allow_pickle=False)
            ids, offsets = arrays["ids"], arrays["offsets"]
            labels = arrays.get("labels", ids)
            if offsets[0] != 0 or offsets[-1] != len(ids) or len(labels) != len(ids) or np.any(np.diff(offsets) < 0):
                raise ValueError(f"{part} arrays do not fit together")
            sets[part] = Tokens.flat(ids, labels, offsets)
        with contextlib.suppress(OSError):  # when it was last used (`lorakit cache list`); a read-only cache is fine
            os.utime(entry / "meta.json")
        return Prepared(sets["train"], sets["eval"], meta["report"], cache="hit", cache_key=key)
    except Exception as e:  # whatever is wrong with the entry, preparing the data again is the answer
        log.warning("data: ignoring the damaged cache entry %s (%s); preparing the data again", entry, e)
        return None


# --- preparing --------------------------------------------------------------------------------


def prepare(section: DataSection, tokenizer, seed: int) -> Prepared:
    """Prepared data for this section, tokenizer and seed: from the cache when it holds it, else built (and stored)."""
    started = time.perf_counter()
    if not section.cache:
        prepared = build(section, tokenizer, seed)
    else:
        key = cache_key(section, tokenizer, seed)
        entry = cache_root() / key
        prepared = load_cached(entry, key)
        if prepared is None:
            prepared = build(section, tokenizer, seed)
            prepared.cache_key = key
            try:
                save_cached(prepared, entry, key)
                prepared.cache = "stored"
            except OSError as e:
                prepared.cache = f"{entry.parent}: {e.strerror or e}"
                log.warning("data: could not cache the prepared data in %s (%s)", entry.parent, e)
    prepared.seconds = time.perf_counter() - started
    log.info("data: %s", prepared.origin())
    return prepared


def build(section: DataSection, tokenizer, seed: int) -> Prepared:
    """Read, format, tokenize, chunk, mix and split every source; check there is enough to train on."""
    rng = random.Random(seed)
    block = section.block_size
    fraction = section.eval_split if isinstance(section.eval_split, float) else 0.0
    per_source: list[Tokens] = []
    held_out: list[Tokens] = []
    report_sources = []
    for src in section.sources:
        records = read_records(src)
        docs = format_tokens(tokenizer, records, src.format)
        pieces = docs.chunk(block)
        if not len(pieces):
            raise LorakitError(f"{src.path}: no usable text in this source (empty, or nothing to learn from)")
        # Hold out whole documents when there are enough of them, else block-sized pieces.
        if len(docs) >= MIN_DOCS_FOR_DOC_SPLIT:
            kept, held = split_eval(list(range(len(docs))), fraction, rng)
            train, evals = docs.take(kept).chunk(block), docs.take(held).chunk(block)
        else:
            kept, held = split_eval(list(range(len(pieces))), fraction, rng)
            train, evals = pieces.take(kept), pieces.take(held)
        per_source.append(train)
        held_out.append(evals)
        report_sources.append(
            {
                "path": src.path,
                "format": src.format,
                "weight": src.weight,
                "documents": len(records),
                "examples": len(train) + len(evals),
            }
        )
    if isinstance(section.eval_split, str):
        eval_src = section.sources[0].model_copy(update={"path": section.eval_split, "weight": 1.0})
        held_out = [format_tokens(tokenizer, read_records(eval_src), eval_src.format).chunk(block)]
    # Mix and shuffle positions into the sources' examples: the same draws as on the examples themselves.
    picks = mix([list(range(len(t))) for t in per_source], [s.weight for s in section.sources], rng)
    firsts = _offsets([len(t) for t in per_source])
    order = [int(first) + i for first, picked in zip(firsts[:-1], picks, strict=True) for i in picked]
    rng.shuffle(order)
    train = Tokens.concat(per_source).take(order).compact()
    eval_set = Tokens.concat(held_out).compact()
    total = train.n_tokens()
    if total < block:
        raise LorakitError(
            f"training data has {total} tokens, less than one block (data.block_size={block}); "
            "add data or lower data.block_size"
        )
    for info, tokens, picked in zip(report_sources, per_source, picks, strict=True):
        info["train_tokens"] = tokens.take(picked).n_tokens()
        info["share"] = round(info["train_tokens"] / total, 4)
    report = {
        "sources": report_sources,
        "train_tokens": total,
        "train_examples": len(train),
        "eval_tokens": eval_set.n_tokens(),
        "eval_examples": len(eval_set),
        "supervised_tokens": train.n_supervised(),
    }
    return Prepared(train, eval_set, report)
