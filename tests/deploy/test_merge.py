"""Merging an adapter into its base, and the store verbs `adapters show` / `adapters rm`.

Adapters are trained in-process on the tiny models (about a second each); every merged model is
compared with plain PEFT's base+adapter and reloaded with plain transformers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import CHATML, RECIPES, logits, quiet, read_meta, run_cli, trained
from lorakit.data.prepare import prepare
from lorakit.deploy.merge import DEFAULT_TOLERANCE, MERGE_FILE, merge_adapter, save_merged
from lorakit.deploy.verify import SAMPLE_TOKENS, verification_samples
from lorakit.errors import LorakitError
from lorakit.models.reference import resolve
from lorakit.models.tokenizer import load_tokenizer
from lorakit.recipe import DataSection
from lorakit.store.adapters import list_adapters, load_meta, remove_adapter
from lorakit.store.metadata import AdapterMeta

TIDES = RECIPES / "data" / "tides.txt"


def peft_logits(base_dir: Path, adapter: Path) -> torch.Tensor:
    """The reference: plain PEFT on the full-precision base."""
    return logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter)).eval())


def plain(out: Path):
    return AutoModelForCausalLM.from_pretrained(out).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models are too small to gain from threads, and on a busy 2-core machine two threads
    waiting on each other make each forward pass ~100x slower (measured 0.33 s vs 0.003 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # for the CLI subprocesses
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama_store(tiny_llama, tmp_path_factory) -> Path:
    return trained(tiny_llama, tmp_path_factory.mktemp("llama"), "tiny", held_out=True)


@pytest.fixture(scope="module")
def gpt2_store(tiny_gpt2, tmp_path_factory) -> Path:
    return trained(tiny_gpt2, tmp_path_factory.mktemp("gpt2"), "g")


# --- equivalence ------------------------------------------------------------------------------


def test_gpt2_conv1d_merge_reproduces_base_plus_adapter(gpt2_store, tiny_gpt2, tmp_path):
    assert json.loads((gpt2_store / "g" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    report = merge_adapter(gpt2_store, "g", tmp_path / "out", say=quiet)
    reference = peft_logits(tiny_gpt2, gpt2_store / "g")
    assert (reference - logits(plain(tiny_gpt2))).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(logits(plain(tmp_path / "out")), reference)
    assert report.relative_diff <= 1e-4 and report.adapter_effect > 1e-2
    assert report.perplexity_merged == pytest.approx(report.perplexity_adapter, rel=1e-5)


def test_llama_merge_keeps_tied_embeddings_and_loads_without_peft(llama_store, tiny_llama, tmp_path):
    out = tmp_path / "out"
    merge_adapter(llama_store, "tiny", out, say=quiet)
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json"} <= files
    assert not files & {"adapter_config.json", "adapter_model.safetensors"}
    model = plain(out)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tensors = load_file(out / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.weight" in tensors and not any("lora" in k for k in tensors)
    torch.testing.assert_close(logits(model), peft_logits(tiny_llama, llama_store / "tiny"))


def test_lm_head_trained_on_a_tied_model_is_untied_and_kept(tiny_llama, tmp_path):
    store = trained(tiny_llama, tmp_path, "head", lora={"modules_to_save": ["lm_head"]})
    merge_adapter(store, "head", tmp_path / "out", say=quiet)
    model = plain(tmp_path / "out")
    base = plain(tiny_llama)
    assert not model.config.tie_word_embeddings
    torch.testing.assert_close(model.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert (model.lm_head.weight - base.lm_head.weight).abs().max() > 1e-3  # the trained head was written
    torch.testing.assert_close(logits(model), peft_logits(tiny_llama, store / "head"))


@pytest.fixture(scope="module")
def qlora_store(tiny_llama, tmp_path_factory):
    return trained(tiny_llama, tmp_path_factory.mktemp("qlora"), "q", base_model={"quantization": "4bit"})


def nf4_reference(base_dir: Path, adapter: Path) -> torch.Tensor:
    """The reference for a QLoRA merge: transformers' own 4-bit load of the base (lorakit's settings: NF4, double
    quantization), dequantized by transformers, with the adapter attached by plain PEFT."""
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.uint8)  # fmt: skip
    base = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=config, device_map="cpu")
    return logits(PeftModel.from_pretrained(base.dequantize(dtype=torch.float32), str(adapter)).eval())


def test_qlora_merge_measures_both_bases_against_the_model_trained(qlora_store, tiny_llama, tmp_path):
    """An adapter trained on a 4-bit base is merged into the dequantized 4-bit weights (what it was trained on) and
    into the original weights; both are measured against the trained model, the table is printed and stored, and
    the closer one (the dequantized) is written."""
    said: list[str] = []
    report = merge_adapter(qlora_store, "q", tmp_path / "out", say=said.append)
    by = {c["candidate"]: c for c in report.qlora["candidates"]}
    assert set(by) == {"dequantized", "original"}
    assert by["dequantized"]["relative_diff"] < by["original"]["relative_diff"]
    assert by["dequantized"]["greedy_agreement"] >= by["original"]["greedy_agreement"]
    assert report.qlora["chosen"] == "dequantized" and "closer to the model trained" in report.qlora["why"]
    assert any("merged model vs the model trained" in line for line in said) and report.route in said
    record = json.loads((tmp_path / "out" / MERGE_FILE).read_text())
    assert record["qlora"]["chosen"] == "dequantized" and len(record["qlora"]["candidates"]) == 2
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    model = plain(tmp_path / "out")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    torch.testing.assert_close(logits(model), nf4_reference(tiny_llama, qlora_store / "q"))


def test_qlora_merge_into_the_original_weights_on_request(qlora_store, tiny_llama, tmp_path):
    report = merge_adapter(qlora_store, "q", tmp_path / "out", qlora_merge="original", say=quiet)
    assert report.qlora["chosen"] == "original" and "the dequantized one is closer" in report.qlora["why"]
    torch.testing.assert_close(logits(plain(tmp_path / "out")), peft_logits(tiny_llama, qlora_store / "q"))
    with pytest.raises(LorakitError, match="--qlora-merge must be one of auto, dequantized, original"):
        merge_adapter(qlora_store, "q", tmp_path / "other", qlora_merge="nf4", say=quiet)


def test_bfloat16_merge_within_its_tolerance(llama_store, tiny_llama, tmp_path):
    report = merge_adapter(llama_store, "tiny", tmp_path / "out", dtype="bfloat16", say=quiet)
    model = plain(tmp_path / "out")
    assert model.dtype == torch.bfloat16
    assert report.tolerance == DEFAULT_TOLERANCE["bfloat16"] and report.relative_diff <= report.tolerance
    reference = peft_logits(tiny_llama, llama_store / "tiny")
    assert (logits(model).float() - reference).abs().max() < 0.1 * report.adapter_effect


def test_merge_record_and_tokenizer_files(llama_store, tiny_llama, tmp_path):
    out = tmp_path / "out"
    report = merge_adapter(llama_store, "tiny", out, say=quiet)
    record = json.loads((out / MERGE_FILE).read_text())
    assert record["adapter"] == "tiny" and record["base_model"] == str(tiny_llama) and record["dtype"] == "float32"
    assert record["max_abs_diff"] == report.max_abs_diff and record["tolerance"] == 1e-4
    assert record["perplexity_merged"] > 1 and record["base_fingerprint"].startswith("sha256:")
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == read_meta(llama_store, "tiny")["tokenizer"]["chat_template"] == CHATML
    generation = json.loads((out / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    assert tok.eos_token_id in (eos if isinstance(eos, list) else [eos])
    assert generation["pad_token_id"] == tok.pad_token_id  # one pad token for the tokenizer and generation


def test_merged_pad_token_agrees_with_the_tokenizer_whatever_the_base_said(llama_store, tiny_llama, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    gen = json.loads((base / "generation_config.json").read_text())
    (base / "generation_config.json").write_text(json.dumps({**gen, "pad_token_id": 3}))  # not the tokenizer's
    merge_adapter(llama_store, "tiny", tmp_path / "out", base=str(base), say=quiet)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.pad_token_id != 3
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["pad_token_id"] == tok.pad_token_id


def test_other_base_with_same_weights_keeps_and_adds_eos_ids(llama_store, tiny_llama, tmp_path):
    """--base pointing at a copy with identical weights is accepted; the copy's EOS ids are kept."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama, copy)
    gen = json.loads((copy / "generation_config.json").read_text())
    (copy / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": 0}))
    merge_adapter(llama_store, "tiny", tmp_path / "out", base=str(copy), say=quiet)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.eos_token_id != 0
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"] == [
        0,
        tok.eos_token_id,
    ]


# --- refusals ---------------------------------------------------------------------------------


def test_base_with_other_weights_is_refused(llama_store, tiny_llama, tmp_path):
    changed = tmp_path / "changed"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(0.01)
    model.save_pretrained(changed)
    with pytest.raises(LorakitError, match="trained on base weights.*nothing merged"):
        merge_adapter(llama_store, "tiny", tmp_path / "out", base=str(changed), say=quiet)
    assert not (tmp_path / "out").exists()


def _perturb_merge(monkeypatch):
    original = BaseTuner.merge_and_unload

    def broken(self, *args, **kwargs):
        model = original(self, *args, **kwargs)
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.weight.add_(0.5)
        return model

    monkeypatch.setattr(BaseTuner, "merge_and_unload", broken)


def _perturb_save(monkeypatch):
    original = save_merged

    def broken(model, tokenizer, path):
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.weight.add_(0.5)
        original(model, tokenizer, path)

    monkeypatch.setattr("lorakit.deploy.merge.save_merged", broken)


@pytest.mark.parametrize("perturb", [_perturb_merge, _perturb_save], ids=["in-memory", "written"])
@pytest.mark.parametrize("existing", [False, True], ids=["new-out", "overwrite"])
def test_failed_verification_writes_nothing(llama_store, tmp_path, monkeypatch, perturb, existing):
    out = tmp_path / "work" / "out"
    if existing:
        out.mkdir(parents=True)
        (out / "keep.txt").write_text("previous")
    perturb(monkeypatch)
    with pytest.raises(LorakitError, match=r"differs from base\+adapter by .* > tolerance 1e-04.*nothing written"):
        merge_adapter(llama_store, "tiny", out, overwrite=True, say=quiet)
    left = sorted(p.name for p in (tmp_path / "work").iterdir()) if (tmp_path / "work").exists() else []
    assert left == (["out"] if existing else [])  # no temporary folder left behind
    if existing:
        assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_existing_out_needs_overwrite(llama_store, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(LorakitError, match="exists and is not empty; use --overwrite"):
        merge_adapter(llama_store, "tiny", out, say=quiet)
    assert (out / "old.txt").read_text() == "x"
    merge_adapter(llama_store, "tiny", out, overwrite=True, say=quiet)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("where", ["store", "adapter", "store-parent", "base"])
def test_out_overlapping_what_the_merge_reads_is_refused(llama_store, tiny_llama, tmp_path, where):
    store = tmp_path / "work" / "adapters"
    shutil.copytree(llama_store, store)
    out = {"store": store, "adapter": store / "tiny", "store-parent": tmp_path, "base": tiny_llama / "sub"}[where]
    with pytest.raises(LorakitError, match="overlaps"):
        merge_adapter(store, "tiny", out, overwrite=True, say=quiet)
    assert (store / "tiny" / "adapter_model.safetensors").is_file() and not (tiny_llama / "sub").exists()


def test_unknown_adapter_and_dtype(llama_store, tmp_path):
    with pytest.raises(LorakitError, match=r"no adapter 'nope'.*adapters: tiny"):
        merge_adapter(llama_store, "nope", tmp_path / "out", say=quiet)
    with pytest.raises(LorakitError, match="dtype must be one of float32, bfloat16, float16"):
        merge_adapter(llama_store, "tiny", tmp_path / "out", dtype="int8", say=quiet)


def test_imported_adapter_needs_base_and_uses_the_built_in_text(llama_store, tiny_llama, tmp_path):
    store = tmp_path / "adapters"
    shutil.copytree(llama_store, store)
    (store / "tiny" / "lorakit.json").unlink()  # an adapter trained elsewhere: plain PEFT files only
    with pytest.raises(LorakitError, match="does not record its base model; pass --base .*adapter_config.json names"):
        merge_adapter(store, "tiny", tmp_path / "out", say=quiet)
    report = merge_adapter(store, "tiny", tmp_path / "out", base=str(tiny_llama), say=quiet)
    assert "built-in text" in report.samples and report.route == "merged into a float32 copy of the base"
    torch.testing.assert_close(logits(plain(tmp_path / "out")), peft_logits(tiny_llama, llama_store / "tiny"))


# --- verification samples ---------------------------------------------------------------------


def test_samples_are_the_documents_training_held_out(llama_store, tiny_llama):
    meta = load_meta(llama_store, "tiny")
    tok = load_tokenizer(resolve(str(tiny_llama)))
    samples, where = verification_samples(meta, tok)
    assert where.startswith("4 held-out documents of tides.txt") and len(samples) == 4
    data = prepare(DataSection.model_validate(meta.recipe.data), tok, meta.seed)
    block = meta.recipe.data["block_size"]
    held = {tuple(e.input_ids) for e in data.eval}
    seen = {tuple(e.input_ids) for e in data.train}
    for s in samples:
        assert tuple(s.input_ids[:block]) in held and tuple(s.input_ids[:block]) not in seen


def typed(meta: dict) -> AdapterMeta:
    """lorakit.json as lorakit reads it, from the dict a test has edited."""
    return AdapterMeta.model_validate(meta)


def held_out_examples(meta, tok) -> tuple[list[int], list, object]:
    """The recorded held-out indices, the first source's documents formatted, and the data prepared afresh."""
    from lorakit.data.formats import format_tokens
    from lorakit.data.sources import read_records

    section = DataSection.model_validate(meta["recipe"]["data"])
    docs = format_tokens(tok, read_records(section.sources[0]), section.sources[0].format)
    return meta["data"]["sources"][0]["held_out"], docs, prepare(section, tok, meta["seed"])


def test_verify_reads_exactly_the_documents_prepare_held_out(llama_store, tiny_llama):
    meta = read_meta(llama_store, "tiny")
    tok = load_tokenizer(resolve(str(tiny_llama)))
    held, docs, data = held_out_examples(meta, tok)
    assert len(held) >= 4 and held == sorted(set(held))
    # The recorded documents are the eval set: chunked, they give exactly the eval examples, none of them trained on.
    block = meta["recipe"]["data"]["block_size"]
    assert docs.take(held).chunk(block).examples() == data.eval
    assert not {tuple(e.input_ids) for e in data.eval} & {tuple(e.input_ids) for e in data.train}
    samples, where = verification_samples(typed(meta), tok)
    assert where.startswith("4 held-out documents of tides.txt")
    assert [s.input_ids for s in samples] == [e.input_ids[:SAMPLE_TOKENS] for e in docs.take(held[:4]).examples()]


def test_verify_follows_the_recorded_documents_not_a_split_of_its_own(llama_store, tiny_llama, monkeypatch):
    import lorakit.deploy.verify as verify

    meta = read_meta(llama_store, "tiny")
    tok = load_tokenizer(resolve(str(tiny_llama)))
    held, docs, _ = held_out_examples(meta, tok)
    expected = [e.input_ids[:SAMPLE_TOKENS] for e in docs.take(held[:4]).examples()]

    def another_split(items, fraction, rng):  # what a changed split in data.prepare would hold out
        n = max(1, round(len(items) * fraction))
        return items[n:], items[:n]

    assert another_split(list(range(len(docs))), 0.1, None)[1][:4] != held[:4]
    monkeypatch.setattr(verify, "split_eval", another_split)
    assert [s.input_ids for s in verification_samples(typed(meta), tok)[0]] == expected
    # Without the record (an adapter written before it existed), verify repeats the split as it now stands.
    del meta["data"]["sources"][0]["held_out"]
    samples, where = verification_samples(typed(meta), tok)
    assert where.startswith("4 held-out documents")
    assert [s.input_ids for s in samples] == [e.input_ids[:SAMPLE_TOKENS] for e in docs.take([0, 1, 2, 3]).examples()]


def test_verify_does_not_trust_held_out_indices_of_changed_data(llama_store, tiny_llama, tmp_path):
    meta = read_meta(llama_store, "tiny")
    tok = load_tokenizer(resolve(str(tiny_llama)))
    copy = tmp_path / "tides.txt"
    shutil.copy(TIDES, copy)
    meta["recipe"]["data"]["sources"][0]["path"] = str(copy)
    assert verification_samples(typed(meta), tok)[1].startswith("4 held-out documents")  # moved, not changed
    copy.write_text(TIDES.read_text().replace("tide", "flood", 1))
    samples, where = verification_samples(typed(meta), tok)
    assert "built-in text" in where and len(samples) == 1


def test_samples_fall_back_to_a_built_in_text(llama_store, tiny_llama):
    meta = load_meta(llama_store, "tiny")
    meta.recipe.data["sources"][0]["path"] = "/nonexistent/tides.txt"
    tok = load_tokenizer(resolve(str(tiny_llama)))
    samples, where = verification_samples(meta, tok)
    assert "built-in text" in where and len(samples) == 1 and len(samples[0].input_ids) > 20


# --- store verbs ------------------------------------------------------------------------------


def test_remove_adapter(llama_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(llama_store, store)
    assert remove_adapter(store, "tiny", confirm=lambda path: False) is None
    assert (store / "tiny" / "adapter_model.safetensors").is_file()
    assert remove_adapter(store, "tiny") == (store / "tiny").resolve()
    assert list(store.iterdir()) == [] and list_adapters(store) == []
    with pytest.raises(LorakitError, match="no adapter 'tiny'"):
        remove_adapter(store, "tiny")


def cli(*args: str, cwd: Path, stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    """Like conftest.run_cli, with stdin under the test's control (never the developer's terminal)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "lorakit.cli", *args]
    return subprocess.run(cmd, cwd=cwd, stdin=stdin, capture_output=True, text=True, timeout=120, env=env)


def test_cli_rm_asks_and_refuses_without_a_terminal(llama_store, tmp_path):
    shutil.copytree(llama_store, tmp_path / "adapters")
    res = cli("adapters", "rm", "tiny", cwd=tmp_path)
    assert res.returncode == 2 and "no terminal" in res.stderr and "--yes" in res.stderr, res.stderr
    assert (tmp_path / "adapters" / "tiny").is_dir()
    master, slave = os.openpty()  # a real terminal: the user answers the question
    try:
        os.write(master, b"n\n")
        res = cli("adapters", "rm", "tiny", cwd=tmp_path, stdin=slave)
        assert res.returncode == 1 and (tmp_path / "adapters" / "tiny").is_dir(), res.stdout + res.stderr
        os.write(master, b"y\n")
        res = cli("adapters", "rm", "tiny", cwd=tmp_path, stdin=slave)
    finally:
        os.close(master)
        os.close(slave)
    assert res.returncode == 0 and not (tmp_path / "adapters" / "tiny").exists(), res.stdout + res.stderr
    res = cli("adapters", "rm", "tiny", "--yes", cwd=tmp_path)
    assert res.returncode == 2 and "no adapter 'tiny'" in res.stderr


def test_cli_show(llama_store, tiny_llama):
    work = llama_store.parent
    res = cli("adapters", "show", "tiny", "--json", cwd=work)
    assert res.returncode == 0, res.stderr
    shown = json.loads(res.stdout)
    assert shown == read_meta(llama_store, "tiny")
    assert shown["data"]["sources"][0]["share"] == 1.0
    res = cli("adapters", "show", "tiny", cwd=work, stdin=None)
    assert res.returncode == 0, res.stderr
    text = "".join(res.stdout.split())
    for needle in (
        "LoRA",
        str(tiny_llama),
        "q_proj",
        "100.0%",
        "tides.txt",
        "learning_rate:",
        "peft",
        "learning rate 0.02 (recipe)",
    ):
        assert "".join(needle.split()) in text, needle


def test_cli_merge(llama_store, tiny_llama):
    work = llama_store.parent
    (work / "taken").mkdir()
    (work / "taken" / "file.txt").write_text("x")
    with ThreadPoolExecutor(2) as pool:  # two independent runs: each pays for importing torch
        runs = [pool.submit(run_cli, "merge", "tiny", "--out", out, cwd=work) for out in ("merged", "taken")]
        res, refused = (r.result() for r in runs)
    assert res.returncode == 0, res.stdout + res.stderr
    text = " ".join(res.stdout.split())
    assert "merged into a float32 copy of the base" in text and "perplexity: base+adapter" in text
    assert "held-out documents of tides.txt" in text and "wrote merged model" in text
    torch.testing.assert_close(logits(plain(work / "merged")), peft_logits(tiny_llama, llama_store / "tiny"))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "exists and is not empty; use --overwrite" in " ".join(refused.stderr.split())
    assert [p.name for p in (work / "taken").iterdir()] == ["file.txt"]
