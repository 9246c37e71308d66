"""Filesystem helpers every stage shares: lorakit's cache folder, the one atomic way to write a folder a user will
trust, flushing a tree to disk, file digests, sizes."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Hidden siblings older than this are leftovers of an interrupted write; younger ones may be another process's.
LEFTOVER_AGE_S = 3600


def cache_dir() -> Path:
    """lorakit's cache: $LORAKIT_CACHE, else $XDG_CACHE_HOME/lorakit, else ~/.cache/lorakit."""
    if os.environ.get("LORAKIT_CACHE"):
        return Path(os.environ["LORAKIT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lorakit"


def fsync_tree(path: Path) -> None:
    """Flush every file below `path`, and the folder itself, to disk."""
    for f in path.rglob("*"):
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 4 MB blocks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def dir_size(path: Path) -> int:
    """Bytes in every file below `path`."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Write a folder a user will take as good: build it in the hidden sibling this yields, then put it in place.

    When the block ends, the new folder is flushed to disk and renamed over `final` in one step; the previous
    folder of that name is set aside first and removed only once the new one is in place. If the block raises,
    or the disk fills while flushing, the partial folder is removed and `final` is as it was: nothing half-written
    is ever where a user looks. Leftovers of writes interrupted by a kill (hidden `.tmp-NAME-*` and
    `.old-NAME-*` siblings an hour old) are removed first."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(final)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(new: Path, final: Path) -> None:
    """Rename the complete folder `new` to `final`, which may exist: the old one survives any failure."""
    old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
    if final.exists():
        final.rename(old)
    try:
        new.rename(final)
    except OSError:
        if old.exists() and not final.exists():
            old.rename(final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def remove_leftovers(final: Path, now: float | None = None) -> list[Path]:
    """Remove the hidden temporary siblings of `final` that interrupted writes left (an hour old or more)."""
    now = time.time() if now is None else now
    gone = []
    for prefix in (".tmp-", ".old-"):
        for p in final.parent.glob(f"{prefix}{final.name}-*"):
            try:
                stale = now - p.lstat().st_mtime >= LEFTOVER_AGE_S
            except OSError:
                continue
            if stale and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p)
    return gone
