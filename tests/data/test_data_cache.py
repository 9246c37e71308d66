"""The prepared-data cache: same data as preparing afresh, keyed by every input, safe against damage."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import CHATML, RECIPES
from lorakit.data.cache import _npy, cache_key
from lorakit.data.content import content_hash, data_content
from lorakit.data.formats import _batches, encode
from lorakit.data.prepare import prepare
from lorakit.recipe import DataSection


def load_tok(path: Path):
    from transformers import AutoTokenizer

    from lorakit.models.tokenizer import fix_pad_token

    tok = AutoTokenizer.from_pretrained(path)
    fix_pad_token(tok)
    return tok


@pytest.fixture(scope="module")
def llama_tok(tiny_llama):
    return load_tok(tiny_llama)


@pytest.fixture(scope="module")
def gpt2_tok(tiny_gpt2):
    return load_tok(tiny_gpt2)


@pytest.fixture
def cache_home(tmp_path, monkeypatch) -> Path:
    """lorakit's cache under tmp_path through XDG_CACHE_HOME; HOME moves too, so ~/.cache is out of reach."""
    monkeypatch.delenv("LORAKIT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "xdg" / "lorakit" / "data"


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A folder of text files (many paragraphs) and a separate eval file."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for f in sorted((RECIPES / "data" / "lighthouse").glob("*.md"))[:6]:
        shutil.copy(f, folder / f.name)
    shutil.copy(RECIPES / "data" / "tides.txt", tmp_path / "eval.txt")
    return folder


def section(corpus: Path, **kw) -> DataSection:
    body = {"sources": [{"path": str(corpus), "split": "paragraph"}], "block_size": 32, "eval_split": 0.2}
    return DataSection(**{**body, **kw})


def entries(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.exists() else []


def same_data(a, b) -> None:
    assert a.train == b.train
    assert a.eval == b.eval
    assert a.report == b.report
    for x, y in zip(a.datasets(), b.datasets(), strict=True):
        assert (x is None) == (y is None)
        if x is not None:
            assert x.features == y.features
            assert x.to_dict() == y.to_dict()


# --- hits --------------------------------------------------------------------------------------


def test_cached_data_is_identical_to_preparing_afresh(cache_home, corpus, llama_tok):
    sources = [{"path": str(corpus), "split": "paragraph", "weight": 1.5}, {"path": str(corpus), "weight": 0.5}]
    sec = section(corpus, sources=sources)
    afresh = prepare(sec.model_copy(update={"cache": False}), llama_tok, 3)
    first = prepare(sec, llama_tok, 3)
    again = prepare(sec, llama_tok, 3)
    assert (afresh.cache, first.cache, again.cache) == ("off", "stored", "hit")
    assert len(afresh.train) > 20 and len(afresh.eval) > 2
    same_data(first, afresh)
    same_data(again, afresh)
    assert entries(cache_home) == [cache_home / first.cache_key]
    assert again.cache_key == first.cache_key
    assert again.origin().startswith(f"cached (key {first.cache_key[:12]}")
    assert first.origin().startswith("prepared in")


def test_a_hit_tokenizes_nothing(cache_home, corpus, llama_tok, monkeypatch):
    first = prepare(section(corpus), llama_tok, 0)

    def no_build(*args, **kwargs):
        raise AssertionError("prepared again on a cache hit")

    monkeypatch.setattr("lorakit.data.prepare.build", no_build)
    again = prepare(section(corpus), llama_tok, 0)
    assert again.cache == "hit"
    assert again.train == first.train and again.eval == first.eval


RERUN = """
import sys
from transformers import AutoTokenizer
from lorakit.data.prepare import prepare
from lorakit.recipe import DataSection
tok = AutoTokenizer.from_pretrained(sys.argv[1])
sec = DataSection(sources=[{"path": sys.argv[2], "split": "paragraph"}], block_size=32)
print(prepare(sec, tok, 0).cache)
"""


def test_a_rerun_in_a_new_process_hits(tmp_path, corpus, tiny_llama):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path / "home")}
    env.pop("LORAKIT_CACHE", None)
    cmd = [sys.executable, "-c", RERUN, str(tiny_llama), str(corpus)]
    runs = [subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300) for _ in range(2)]
    assert [r.stdout.strip().splitlines()[-1] for r in runs] == ["stored", "hit"], runs[-1].stderr[-2000:]


def test_the_same_bytes_written_again_still_hit(cache_home, corpus, llama_tok):
    first = prepare(section(corpus), llama_tok, 0)
    f = next(corpus.iterdir())
    f.write_bytes(f.read_bytes())  # a new modification time, the same content
    assert prepare(section(corpus), llama_tok, 0).cache_key == first.cache_key
    assert len(entries(cache_home)) == 1


# --- misses ------------------------------------------------------------------------------------


def changed_inputs(change: str, corpus: Path, tok, gpt2_tok):
    """A section, tokenizer and seed that differ from the base ones (eval file, seed 0) in one way."""
    sec, seed = section(corpus, eval_split=str(corpus.parent / "eval.txt")), 0
    if change == "file content":
        f = sorted(corpus.iterdir())[2]
        f.write_text(f.read_text().replace("the", "a", 1))
    elif change == "new file":
        (corpus / "zz-extra.txt").write_text("One more entry for the log, written at dusk.")
    elif change == "eval file":
        (corpus.parent / "eval.txt").write_text("A different held-out text about the lamp and the tide.")
    elif change == "tokenizer":
        tok = gpt2_tok
    elif change == "chat template":
        tok = copy.deepcopy(tok)
        tok.chat_template = CHATML.replace("'\n'", "'\n\n'")
    elif change == "block size":
        sec = sec.model_copy(update={"block_size": 48})
    elif change == "seed":
        seed = 1
    elif change == "split":
        sec = sec.model_copy(update={"sources": [sec.sources[0].model_copy(update={"split": "line"})]})
    return sec, tok, seed


@pytest.mark.parametrize(
    "change",
    ["file content", "new file", "eval file", "tokenizer", "chat template", "block size", "seed", "split"],
)
def test_a_change_to_any_input_misses_the_cache(cache_home, corpus, llama_tok, gpt2_tok, change):
    base = prepare(section(corpus, eval_split=str(corpus.parent / "eval.txt")), llama_tok, 0)
    sec, tok, seed = changed_inputs(change, corpus, llama_tok, gpt2_tok)
    changed = prepare(sec, tok, seed)
    assert (base.cache, changed.cache) == ("stored", "stored")
    assert changed.cache_key != base.cache_key
    assert len(entries(cache_home)) == 2
    same_data(changed, prepare(sec.model_copy(update={"cache": False}), tok, seed))


def test_packing_and_the_cache_switch_share_one_entry(cache_home, corpus, llama_tok):
    first = prepare(section(corpus), llama_tok, 0)
    assert prepare(section(corpus, packing=False), llama_tok, 0).cache == "hit"
    assert len(entries(cache_home)) == 1
    sec = section(corpus, packing=False)
    assert first.cache_key == cache_key(sec, data_content(sec), llama_tok, 0)


# --- damage ------------------------------------------------------------------------------------


def damage(entry: Path, kind: str) -> None:
    ids = entry / "train_ids.npy"
    if kind == "truncated array":
        ids.write_bytes(ids.read_bytes()[: ids.stat().st_size // 2])
    elif kind == "changed token":
        raw = bytearray(ids.read_bytes())
        raw[-7] ^= 0x01  # same size and shape: only the checksum can tell
        ids.write_bytes(bytes(raw))
    elif kind == "missing array":
        (entry / "train_offsets.npy").unlink()
    elif kind == "meta not json":
        (entry / "meta.json").write_text('{"format": ')
    elif kind == "meta of another format":
        meta = json.loads((entry / "meta.json").read_text())
        (entry / "meta.json").write_text(json.dumps({**meta, "format": meta["format"] + 1}))
    elif kind == "offsets past the end":
        meta = json.loads((entry / "meta.json").read_text())
        raw = _npy(np.array([0, 10**9], np.int64))
        (entry / "train_offsets.npy").write_bytes(raw)
        meta["files"]["train_offsets.npy"] = hashlib.sha256(raw).hexdigest()
        (entry / "meta.json").write_text(json.dumps(meta))
    elif kind == "empty folder":
        shutil.rmtree(entry)
        entry.mkdir()
    elif kind == "a file in its place":
        shutil.rmtree(entry)
        entry.write_text("not a folder")


DAMAGE = ["truncated array", "changed token", "missing array", "meta not json", "meta of another format",
          "offsets past the end", "empty folder", "a file in its place"]  # fmt: skip


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_entry_is_rebuilt(cache_home, corpus, llama_tok, kind, caplog):
    first = prepare(section(corpus), llama_tok, 0)
    damage(cache_home / first.cache_key, kind)
    with caplog.at_level(logging.WARNING, logger="lorakit"):
        rebuilt = prepare(section(corpus), llama_tok, 0)
    assert rebuilt.cache == "stored"
    same_data(rebuilt, prepare(section(corpus, cache=False), llama_tok, 0))
    if kind not in ("empty folder", "a file in its place"):
        assert "ignoring the damaged cache entry" in caplog.text
    again = prepare(section(corpus), llama_tok, 0)
    assert again.cache == "hit"
    same_data(again, rebuilt)
    assert entries(cache_home) == [cache_home / first.cache_key]
    assert not [p for p in cache_home.iterdir() if p.name.startswith(".")]  # no temporary folders left


# --- switches and locations --------------------------------------------------------------------


def test_cache_false_neither_reads_nor_writes(cache_home, corpus, llama_tok, monkeypatch):
    off = prepare(section(corpus, cache=False), llama_tok, 0)
    assert off.cache == "off" and off.cache_key is None
    assert not cache_home.exists()
    prepare(section(corpus), llama_tok, 0)

    def no_load(*args, **kwargs):
        raise AssertionError("read the cache with data.cache: false")

    monkeypatch.setattr("lorakit.data.prepare.load_cached", no_load)
    again = prepare(section(corpus, cache=False), llama_tok, 0)
    assert again.cache == "off"
    same_data(again, off)


def test_the_cache_lives_under_xdg_cache_home(cache_home, tmp_path, corpus, llama_tok):
    prepared = prepare(section(corpus), llama_tok, 0)
    assert (tmp_path / "xdg" / "lorakit" / "data" / prepared.cache_key / "meta.json").is_file()
    assert not (tmp_path / "home").exists()


def test_lorakit_cache_overrides_xdg(cache_home, tmp_path, corpus, llama_tok, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "own"))
    prepared = prepare(section(corpus), llama_tok, 0)
    assert (tmp_path / "own" / "data" / prepared.cache_key / "meta.json").is_file()
    assert not cache_home.exists()


def test_an_unwritable_cache_still_prepares(tmp_path, corpus, llama_tok, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.delenv("LORAKIT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    prepared = prepare(section(corpus), llama_tok, 0)
    assert prepared.cache.startswith(str(blocker))
    assert "not cached:" in prepared.origin()
    same_data(prepared, prepare(section(corpus, cache=False), llama_tok, 0))


def test_the_resume_hash_ignores_the_cache_switch(corpus):
    assert content_hash(section(corpus)) == content_hash(section(corpus, cache=False))


@pytest.mark.parametrize("cache", [True, False])
def test_prepare_hashes_each_file_once_for_the_cache_key_and_the_content_hash(corpus, llama_tok, monkeypatch, cache):
    import lorakit.data.content

    hashed = []
    real = lorakit.data.content.sha256_file
    monkeypatch.setattr(lorakit.data.content, "sha256_file", lambda f: hashed.append(Path(f).name) or real(f))
    sec = section(corpus, eval_split=str(corpus.parent / "eval.txt"), cache=cache)
    prepared = prepare(sec, llama_tok, 0)
    assert sorted(hashed) == sorted([f.name for f in corpus.iterdir()] + ["eval.txt"])
    hashed.clear()
    assert prepared.content.hash == content_hash(sec)
    assert prepared.content.files == data_content(sec).files
    assert (prepared.cache_key is not None) == cache


# --- the batched tokenizer path ----------------------------------------------------------------

TEXTS = ["", "plain words", "a turn ends with <|im_end|> here", "ünïcödé ½ — “quoted”", "tide " * 700, "\n\n\t x "]


def split_ids(ids, offsets) -> list[list[int]]:
    return [ids[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


@pytest.mark.parametrize("special", [True, False])
def test_batched_encoding_gives_the_tokenizers_ids(llama_tok, gpt2_tok, special):
    for tok in (llama_tok, gpt2_tok):
        ids, offsets = encode(tok, TEXTS * 3, special=special)
        assert split_ids(ids, offsets) == tok(TEXTS * 3, add_special_tokens=special)["input_ids"]


def test_batched_encoding_ignores_a_truncation_left_on_the_tokenizer(tiny_llama):
    tok = load_tok(tiny_llama)
    tok.backend_tokenizer.enable_truncation(4)
    ids, offsets = encode(tok, TEXTS, special=True)
    assert split_ids(ids, offsets) == tok(TEXTS)["input_ids"]
    assert max(len(r) for r in split_ids(ids, offsets)) > 4


def test_a_tokenizer_with_rules_of_its_own_is_called_as_is(tiny_llama):
    tok = load_tok(tiny_llama)
    base = type(tok)

    class Shouting(base):
        def __call__(self, text, **kw):
            upper = [t.upper() for t in text] if isinstance(text, list) else text.upper()
            return base.__call__(self, upper, **kw)

    tok.__class__ = Shouting
    ids, offsets = encode(tok, TEXTS, special=True)
    assert split_ids(ids, offsets) == tok(TEXTS)["input_ids"]
    assert split_ids(ids, offsets) != base.__call__(tok, TEXTS)["input_ids"]


@pytest.mark.parametrize("before", [None, "false", "true"])
@pytest.mark.parametrize("forked", [False, True])
def test_tokenizer_threads_on_while_encoding_then_restored(llama_tok, monkeypatch, before, forked):
    if before is None:
        monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    else:
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", before)
    if forked:  # as in a process forked after lorakit.data was imported
        monkeypatch.setattr("lorakit.data.formats._PID", os.getpid() + 1)
    seen = []
    batches = _batches

    def spy(texts):
        for batch in batches(texts):
            seen.append(os.environ.get("TOKENIZERS_PARALLELISM"))
            yield batch

    monkeypatch.setattr("lorakit.data.formats._batches", spy)
    encode(llama_tok, TEXTS, special=True)
    assert seen == [before if forked else "true"]
    assert os.environ.get("TOKENIZERS_PARALLELISM") == before


def test_datasets_split_into_arrow_chunks_hold_the_same_rows(corpus, llama_tok, monkeypatch):
    prepared = prepare(section(corpus, cache=False), llama_tok, 0)
    whole, _ = prepared.datasets()
    monkeypatch.setattr("lorakit.data.tokens.ARROW_CHUNK_TOKENS", 100)
    chunked, _ = prepared.datasets()
    assert chunked.data.column("input_ids").num_chunks > 1
    assert chunked.features == whole.features
    assert chunked.to_dict() == whole.to_dict()
