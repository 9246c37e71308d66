"""The prepared-data cache (`<cache>/data`): keys, storing and loading entries, listing and clearing them.

An entry is one folder named by its key (everything the prepared data depends on) with a `meta.json`; a hit
touches that file, so its time is when the entry was last used. Folders starting with a dot are a store in
progress or one being removed; they are only cleared once they are an hour old (another process may be writing
them now)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lorakit.data.content import Content
from lorakit.data.formats import fast_backend
from lorakit.data.tokens import Prepared, Tokens, offsets_of
from lorakit.fs import cache_dir, dir_size
from lorakit.recipe import DataSection

log = logging.getLogger("lorakit")


# Bump when prepare() gives different examples or a different report for the same inputs: older cache entries
# then stop matching. 2: the report lists each source's held-out documents.
DATA_FORMAT = 2


def tokenizer_fingerprint(tokenizer) -> str:
    """What the tokenizer brings to prepared data: its class, vocabulary and rules, special tokens, chat template."""
    backend = fast_backend(tokenizer)
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


def cache_key(section: DataSection, content: Content, tokenizer, seed: int) -> str:
    """Everything prepared data depends on: the data's content hash, the data section, the tokenizer, the seed."""
    facts = {
        "format": DATA_FORMAT,
        "content": content.hash,
        # The whole section, paths too: an entry's report names its sources' paths.
        "section": section.model_dump(mode="json", exclude={"cache", "packing"}),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:40]


def cache_root() -> Path:
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
            arrays = {"ids": tokens.ids, "offsets": offsets_of(tokens.ends - tokens.starts)}
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


LEFTOVER_AGE_S = 3600


@dataclass
class Entry:
    key: str
    path: Path
    bytes: int
    last_used: float  # seconds since the epoch
    train_tokens: int | None
    sources: list[str]

    def as_json(self) -> dict:
        return {
            "key": self.key,
            "path": str(self.path),
            "bytes": self.bytes,
            "last_used": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.last_used)),
            "train_tokens": self.train_tokens,
            "sources": self.sources,
        }


def entries(root: Path | None = None) -> list[Entry]:
    """The cache's entries, most recently used first. An entry whose meta.json is unreadable is listed with no
    sources (a training run would ignore it and prepare the data again)."""
    root = cache_root() if root is None else root
    out = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if not path.is_dir() or path.name.startswith("."):
            continue
        meta_file = path / "meta.json"
        try:
            report = json.loads(meta_file.read_text())["report"]
            sources = [s["path"] for s in report["sources"]]
            tokens = report.get("train_tokens")
        except (OSError, ValueError, KeyError, TypeError):
            sources, tokens = [], None
        used = (meta_file if meta_file.exists() else path).stat().st_mtime
        out.append(Entry(path.name, path, dir_size(path), used, tokens, sources))
    return sorted(out, key=lambda e: e.last_used, reverse=True)


def leftovers(root: Path | None = None, now: float | None = None) -> list[Path]:
    """Dot-folders (unfinished stores, interrupted removals) older than an hour."""
    root = cache_root() if root is None else root
    now = time.time() if now is None else now
    if not root.is_dir():
        return []
    return [
        p for p in root.iterdir() if p.is_dir() and p.name.startswith(".") and now - p.stat().st_mtime > LEFTOVER_AGE_S
    ]


def remove(paths: list[Path]) -> int:
    """Remove cache folders; returns the bytes freed. Each is first renamed out of place (one atomic step), so a
    run starting meanwhile either finds the whole entry or none of it."""
    freed = 0
    for path in paths:
        if not path.is_dir():
            continue
        size = dir_size(path)
        aside = Path(tempfile.mkdtemp(prefix=f".old-{path.name[:12]}-", dir=path.parent))
        try:
            path.rename(aside / "entry")
        except FileNotFoundError:  # another process removed it first
            shutil.rmtree(aside, ignore_errors=True)
            continue
        shutil.rmtree(aside, ignore_errors=True)
        freed += size
    return freed
