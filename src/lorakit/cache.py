"""The prepared-data cache (`<cache>/data`): what it holds, and clearing it.

Each entry is one folder named by its key (see `data.cache_key`) with a `meta.json`; a hit touches that file,
so its time is when the entry was last used. Folders starting with a dot are a store in progress or one being
removed; they are only cleared once they are an hour old (another process may be writing them now).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lorakit.data import cache_root

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


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


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
        out.append(Entry(path.name, path, _size(path), used, tokens, sources))
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
        size = _size(path)
        aside = Path(tempfile.mkdtemp(prefix=f".old-{path.name[:12]}-", dir=path.parent))
        try:
            path.rename(aside / "entry")
        except FileNotFoundError:  # another process removed it first
            shutil.rmtree(aside, ignore_errors=True)
            continue
        shutil.rmtree(aside, ignore_errors=True)
        freed += size
    return freed
