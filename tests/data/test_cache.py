"""`lorakit cache list|clear`: the prepared-data cache as a user sees and empties it."""

from __future__ import annotations

import json
import os
import time

import pytest

from conftest import RECIPES, run_cli
from lorakit.data.cache import entries, leftovers, remove
from lorakit.data.prepare import prepare
from lorakit.recipe import DataSection

TIDES = RECIPES / "data" / "tides.txt"
DAY = 86400


@pytest.fixture
def filled(tiny_llama, tmp_path, monkeypatch):
    """A cache under tmp_path with two entries (block 32 used 10 days ago, block 64 now), a damaged entry from
    10 days ago, a fresh and an old leftover of an interrupted store."""
    from transformers import AutoTokenizer

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    for block in (32, 64):
        prepare(DataSection(sources=[{"path": str(TIDES)}], block_size=block), tok, seed=0)
    root = tmp_path / "cache" / "data"
    ten_days_ago = time.time() - 10 * DAY
    for e in entries(root):
        os.utime(e.path / "meta.json", (ten_days_ago, ten_days_ago))
    prepare(DataSection(sources=[{"path": str(TIDES)}], block_size=64), tok, seed=0)  # a hit: used now
    damaged = root / ("f" * 40)  # no meta.json, made 10 days ago
    damaged.mkdir()
    os.utime(damaged, (ten_days_ago, ten_days_ago))
    for name, age in ((".tmp-fresh", 60), (".tmp-old", 2 * 3600)):
        (root / name).mkdir()
        (root / name / "x.npy").write_bytes(b"0" * 100)
        os.utime(root / name, (time.time() - age, time.time() - age))
    return root, tok


def test_entries_show_sources_sizes_and_last_use(filled):
    root, _ = filled
    found = entries(root)
    assert len(found) == 3
    readable = [e for e in found if e.sources]
    assert len(readable) == 2 and all(e.sources == [str(TIDES)] and e.bytes > 0 for e in readable)
    assert found[0].sources and time.time() - found[0].last_used < 60  # the hit, most recent first
    assert all(time.time() - e.last_used > 9 * DAY for e in readable[1:])
    assert [p.name for p in leftovers(root)] == [".tmp-old"]


def test_cli_lists_and_clears_what_it_is_told_and_nothing_else(filled, tmp_path):
    root, _ = filled
    listed = run_cli("cache", "list", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert len(rows) == 3 and {r["key"] for r in rows} == {e.key for e in entries(root)}

    asked = run_cli("cache", "clear", cwd=tmp_path)  # no terminal to confirm on: refused, nothing removed
    assert asked.returncode == 2 and "pass --yes" in asked.stderr
    assert len(entries(root)) == 3

    stale = run_cli("cache", "clear", "--older-than", "5", "--yes", cwd=tmp_path)
    assert stale.returncode == 0, stale.stderr
    assert "removed 2 entries" in stale.stdout  # the one used 10 days ago and the damaged one
    left = entries(root)
    assert len(left) == 1 and time.time() - left[0].last_used < 600
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == [".tmp-fresh"]

    everything = run_cli("cache", "clear", "--yes", cwd=tmp_path)
    assert everything.returncode == 0 and "removed 1 entries" in everything.stdout
    empty = run_cli("cache", "list", cwd=tmp_path)
    assert empty.returncode == 0 and "no prepared data" in empty.stdout


def test_cleared_data_is_prepared_again(filled):
    root, tok = filled
    remove([e.path for e in entries(root)])
    again = prepare(DataSection(sources=[{"path": str(TIDES)}], block_size=64), tok, seed=0)
    assert again.cache == "stored" and len(entries(root)) == 1
