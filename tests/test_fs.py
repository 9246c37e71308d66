"""The one atomic way to write a folder: the old one survives until the new one is complete; leftovers go."""

from __future__ import annotations

import errno
import os
import shutil
import time

import pytest

from lorakit.fs import LEFTOVER_AGE_S, staged_dir


def _folder(path, text):
    path.mkdir(parents=True)
    (path / "weights").write_text(text)


def test_a_complete_write_replaces_the_old_folder(tmp_path):
    out = tmp_path / "model"
    _folder(out, "old")
    with staged_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-model-")
        (tmp / "weights").write_text("new")
        assert (out / "weights").read_text() == "old"  # untouched until the block ends
    assert (out / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_failed_write_keeps_the_old_folder_and_leaves_nothing(tmp_path):
    out = tmp_path / "model"
    _folder(out, "old")
    with pytest.raises(OSError), staged_dir(out) as tmp:
        (tmp / "weights").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert (out / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_leftovers_of_interrupted_writes_are_cleared_once_stale(tmp_path):
    out = tmp_path / "model"
    stale, fresh = tmp_path / ".tmp-model-dead0001", tmp_path / ".old-model-live0002"
    _folder(stale, "x" * 1000)
    _folder(fresh, "being written by another process")
    old = time.time() - LEFTOVER_AGE_S - 10
    os.utime(stale, (old, old))
    unrelated = tmp_path / ".tmp-other-dead0003"
    _folder(unrelated, "not ours")
    os.utime(unrelated, (old, old))
    with staged_dir(out) as tmp:
        (tmp / "weights").write_text("new")
    assert not stale.exists() and fresh.exists() and unrelated.exists()


def test_export_hf_overwrite_that_fails_keeps_the_previous_export(tiny_llama, tmp_path, monkeypatch):
    from lorakit.deploy.export import export_model
    from lorakit.errors import LorakitError

    out = tmp_path / "exported"
    export_model(str(tiny_llama), "hf", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = shutil.copytree

    def disk_full(src, dst, **kw):
        real(src, dst, **kw)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copytree", disk_full)
    with pytest.raises(LorakitError, match="No space left on device; nothing written"):
        export_model(str(tiny_llama), "hf", out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_written_folders_follow_the_umask_even_for_safetensors(tmp_path, mask):
    """safetensors writes 0600 whatever the umask; a written folder's files get the modes the umask gives."""
    import numpy as np
    from safetensors.numpy import save_file

    previous = os.umask(mask)
    try:
        with staged_dir(tmp_path / "model") as tmp:
            save_file({"w": np.zeros(2, dtype=np.float32)}, tmp / "model.safetensors")
            (tmp / "config.json").write_text("{}")
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "model").iterdir()}
    assert modes == {"model.safetensors": 0o666 & ~mask, "config.json": 0o666 & ~mask}
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o777 & ~mask
