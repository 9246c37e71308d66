"""GGUF and Ollama export of a merged model: written with `gguf`, read back with `gguf` and transformers."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import CHATML, make_tiny_llama
from lorakit.deploy.gguf import TOLERANCE, export_gguf, permute
from lorakit.deploy.ollama import default_system, stop_tokens, write_modelfile
from lorakit.errors import LorakitError

IDS = torch.randint(3, 500, (1, 24), generator=torch.Generator().manual_seed(0))
# Largest |GGUF - source| logit difference allowed in these tests; measured on the tiny Llama:
# f32 0, f16 2.7e-4, q8_0 7.7e-3 (its logits reach about 1.4).
ATOL = {"f32": 1e-5, "f16": 2e-3, "q8_0": 3e-2}
SAMPLE = "<|im_start|>user\nWhen does the tide turn?  Twice a day, 12 hours 25 minutes apart.<|im_end|>\n"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """CLI subprocesses on one thread: on a busy 2-core machine the tiny models run far slower on two."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


def quiet(*_):
    pass


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.fixture(scope="module")
def untied_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama-untied"), tie=False)


@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gguf_round_trip(tiny_llama, untied_llama, tmp_path, qtype, tied):
    src = tiny_llama if tied else untied_llama
    out = tmp_path / "model.gguf"
    report = export_gguf(src, out, qtype, say=quiet)
    assert report.relative_diff <= TOLERANCE[qtype] and report.tokenizer_matches
    reader = gguf.GGUFReader(out)
    field = reader.fields["general.architecture"]
    assert field.contents() == "llama"
    names = {t.name for t in reader.tensors}
    assert ("output.weight" in names) is not tied
    assert len(names) == 1 + 2 * 9 + 1 + (not tied) == report.tensors
    assert {"token_embd.weight", "blk.1.attn_q.weight", "blk.0.ffn_down.weight", "output_norm.weight"} <= names
    assert reader.fields["tokenizer.chat_template"].contents() == CHATML
    assert reader.fields["llama.attention.head_count_kv"].contents() == 2
    norm = next(t for t in reader.tensors if t.name == "blk.0.attn_norm.weight")
    assert norm.tensor_type == gguf.GGMLQuantizationType.F32  # norms stay float32 in every qtype
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32)
    assert loaded.config.tie_word_embeddings is tied
    reference = logits(AutoModelForCausalLM.from_pretrained(src))
    torch.testing.assert_close(logits(loaded), reference, atol=ATOL[qtype], rtol=0)
    if qtype != "f32":
        assert (logits(loaded) - reference).abs().max() > 0  # the weights really were rounded


def test_gguf_tokenizer_encodes_like_the_source(tiny_llama, tmp_path):
    export_gguf(tiny_llama, tmp_path / "m.gguf", "f32", verify=False, say=quiet)
    source = AutoTokenizer.from_pretrained(tiny_llama)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    chat = source.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    for text in (SAMPLE, chat, "Ünïcödé and 漢字 at the harbour\n\n  end"):
        assert loaded(text)["input_ids"] == source(text)["input_ids"], text
    assert loaded.chat_template == CHATML
    assert (loaded.bos_token, loaded.eos_token, loaded.unk_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


def test_permute_matches_llama_cpp_order():
    """Row order per head: llama.cpp interleaves the two rotary halves (rows 0, d/2, 1, d/2+1, ...)."""
    w = torch.arange(8).reshape(8, 1).numpy()  # one head of dimension 8
    assert permute(w, 1).ravel().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    w = torch.arange(8).reshape(8, 1).numpy()  # two kv heads of dimension 4 (n_head 4)
    assert permute(w, 4, 2).ravel().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_gpt2_is_refused(tiny_gpt2, tmp_path):
    with pytest.raises(LorakitError, match="supports Llama-family models.*'gpt2'.*--format hf"):
        export_gguf(tiny_gpt2, tmp_path / "g.gguf", "f16", say=quiet)
    assert list(tmp_path.iterdir()) == []


def test_existing_file_needs_overwrite_and_failure_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    out.write_text("old")
    with pytest.raises(LorakitError, match="exists; use --overwrite"):
        export_gguf(tiny_llama, out, "f32", say=quiet)
    monkeypatch.setitem(TOLERANCE, "q8_0", 1e-9)  # a check that cannot pass
    with pytest.raises(LorakitError, match="differ from the source model's by .* > tolerance.*nothing written"):
        export_gguf(tiny_llama, out, "q8_0", overwrite=True, say=quiet)
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
    with pytest.raises(LorakitError, match="--quant must be one of f32, f16, q8_0"):
        export_gguf(tiny_llama, out, "q4_k", overwrite=True, say=quiet)


def test_modelfile(tiny_llama, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    path, described = write_modelfile(tmp_path / "m.gguf", tok.chat_template, stop_tokens(tok))
    assert described == "the chat template (ChatML)"
    text = path.read_text()
    assert path.name == "Modelfile" and text.startswith("FROM ./m.gguf\n")
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|im_start|>"' in text
    assert text.count('PARAMETER stop "<|im_end|>"') == 1  # EOS is <|im_end|> too: listed once
    inst = "{{ bos_token }}{% for m in messages %}[INST]{% endfor %}"
    other, _ = write_modelfile(tmp_path / "m.gguf", inst, ["</s>"])
    text = other.read_text()
    assert "TEMPLATE" not in text.replace("write a TEMPLATE", "") and "not translated" in text
    assert 'PARAMETER stop "</s>"' in text


@pytest.mark.parametrize("style", ["raw", "alpaca"])
def test_modelfile_follows_how_the_adapter_was_trained(tiny_llama, tmp_path, style):
    """An adapter trained on plain text (or alpaca prompts) is served by Ollama as `lorakit generate` prompts it:
    no chat wrapping, no system prompt, whatever chat template the base model has."""
    from lorakit.data.formats import alpaca_prompt

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    assert tok.chat_template  # the base has one; the adapter was not trained with it
    path, described = write_modelfile(tmp_path / "m.gguf", tok.chat_template, stop_tokens(tok), style)
    text = path.read_text()
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    prompt = "Day 3. Wind:"
    want = prompt if style == "raw" else alpaca_prompt(prompt)
    assert template.replace("{{ .Prompt }}", prompt) == want  # what Ollama sends is what generate sends
    assert "SYSTEM" not in text and "<|im_start|>" not in text and style in described


def test_modelfile_keeps_a_default_system_prompt():
    template = "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM<|im_end|>\\n' }}" + CHATML
    assert default_system(template) == "You are a helpful AI assistant named SmolLM"
    assert default_system(CHATML) is None


# --- the CLI verb -----------------------------------------------------------------------------


def test_cli_export_adapter_and_model_dir(tiny_llama, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from test_merge import peft_logits, trained

    from conftest import run_cli

    store = trained(tiny_llama, tmp_path, "tiny")
    runs = {
        "ollama": ("export", "tiny", "--format", "ollama", "--out", "ollama", "--quant", "f32"),
        "gguf": ("export", str(tiny_llama), "--format", "gguf", "--out", "g/model.gguf", "--quant", "q8_0"),
        "hf": ("export", "tiny", "--format", "hf", "--out", "hf"),
        "notdir": ("export", str(tmp_path / "adapters"), "--format", "gguf", "--out", "x.gguf"),
    }
    with ThreadPoolExecutor(2) as pool:  # independent runs: each pays for importing torch
        done = {k: pool.submit(run_cli, *args, cwd=tmp_path) for k, args in runs.items()}
        res = {k: f.result() for k, f in done.items()}
    for k in ("ollama", "gguf", "hf"):
        assert res[k].returncode == 0, res[k].stdout + res[k].stderr
    reference = peft_logits(tiny_llama, store / "tiny")
    files = sorted(p.name for p in (tmp_path / "ollama").iterdir())
    assert files == ["Modelfile", "tiny.gguf"]  # the merged model's temporary folder is gone
    modelfile = (tmp_path / "ollama" / "Modelfile").read_text()
    assert "FROM ./tiny.gguf" in modelfile and 'TEMPLATE """{{ .Prompt }}"""' in modelfile  # trained on raw text
    assert "Ollama template: raw text" in res["ollama"].stdout
    from_gguf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ollama"), gguf_file="tiny.gguf")
    torch.testing.assert_close(logits(from_gguf), reference, atol=ATOL["f32"], rtol=0)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "hf")), reference)
    q8 = AutoModelForCausalLM.from_pretrained(str(tmp_path / "g"), gguf_file="model.gguf")
    torch.testing.assert_close(logits(q8), logits(AutoModelForCausalLM.from_pretrained(tiny_llama)), atol=3e-2, rtol=0)
    assert res["notdir"].returncode == 2 and "not a model directory" in res["notdir"].stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
