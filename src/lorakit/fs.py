"""Filesystem helpers every stage shares: lorakit's cache folder, the one atomic way to write a folder a user will
trust, flushing a tree to disk, file digests, sizes, and a lock that a second process asking for it is refused."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lorakit.errors import LorakitError

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
        with_umask(tmp)
        fsync_tree(tmp)
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def umask() -> int:
    """This process's umask (read without changing it where the system says it: Linux's /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def with_umask(path: Path) -> None:
    """Give `path` (a file, or every file and folder below it) the modes the user's umask gives new files.

    safetensors writes its files 0600 whatever the umask: a server running as another user could read an
    adapter's config but not its weights."""
    mask = umask()
    path = Path(path)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


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
    """Remove the hidden temporary siblings of `final` (folders or files) that interrupted writes left, once an
    hour old: younger ones may belong to a write still in progress."""
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
            elif stale and (p.is_file() or p.is_symlink()):  # a single-file output's temporary (a GGUF file)
                p.unlink(missing_ok=True)
                gone.append(p)
    return gone


# --- locks -------------------------------------------------------------------------------------------------------


def _try_lock(fd: int) -> bool:
    """Lock the open file `fd` for this process without waiting; False if another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:  # a filesystem without locks (some NFS and FUSE mounts): run unlocked, as before locks
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            return True
        raise
    return True


def _holder_text(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 1 << 16).decode() or "{}")
    except (OSError, ValueError):
        return {}


def lock_holder(path: Path) -> dict | None:
    """Who holds the lock file `path` ({"pid", "command", "started"}), or None when no living process does."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        if _try_lock(fd):
            return None  # released when fd closes: the lock was free (its file may name a process that died)
        return _holder_text(fd) or {"pid": None}
    finally:
        os.close(fd)


@contextmanager
def held_lock(path: Path, what: str) -> Iterator[None]:
    """Hold the lock file `path` while the block runs, so that a second process doing `what` fails at once.

    The operating system releases the lock when its process ends, however it ends (kill -9 included): a lock file
    left by a process that died is simply taken over. The file names the holder (pid, command, start time), and
    the refusal says who it is."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd):
            h = _holder_text(fd)
            who = f"process {h.get('pid', '?')}" + (f" ({h['command']})" if h.get("command") else "")
            since = f", running since {h['started']}" if h.get("started") else ""
            raise LorakitError(
                f"{what} is already running in {who}{since}; wait for it to finish or stop it first (lock: {path})"
            )
        info = {"pid": os.getpid(), "command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(info).encode())
        yield
    finally:
        os.close(fd)  # releases the lock
