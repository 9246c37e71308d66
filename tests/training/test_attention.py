"""Per-document attention for packed rows (lorakit.training.attention) equals transformers' masked sdpa, and
training on the CPU uses it, with frozen weights in bf16 under bf16 autocast."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import RECIPES, tiny_recipe
from lorakit.recipe import validate_recipe
from lorakit.training.attention import NAME, document_spans, pad_packed_row, use_packed_attention
from lorakit.training.run import train

TIDES = RECIPES / "data" / "tides.txt"


def packed_row(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (1, sum(lengths)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    return ids, pos


@pytest.mark.parametrize(
    ("positions", "spans"),
    [
        ([0, 1, 2, 0, 1, 0], [(0, 3), (3, 5), (5, 6)]),
        ([0, 1, 2, 3], [(0, 4)]),
        ([0, 0, 0], [(0, 1), (1, 2), (2, 3)]),
        ([1, 2, 3], None),  # does not start a document
        ([0, 1, 3, 4], None),  # a gap: not consecutive positions
        ([0, 1, 1, 2], None),  # a repeat (left padding, say)
    ],
)
def test_document_spans(positions, spans):
    assert document_spans(torch.tensor([positions]), len(positions)) == spans


def test_document_spans_needs_one_row_of_the_right_length():
    assert document_spans(None, 3) is None
    assert document_spans(torch.tensor([[0, 1], [0, 1]]), 2) is None
    assert document_spans(torch.tensor([[0, 1, 0]]), 4) is None


def forward_backward(model, ids, pos, **kw):
    model.zero_grad()
    out = model(input_ids=ids, position_ids=pos, labels=ids, use_cache=False, **kw)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def test_packed_attention_equals_masked_sdpa_with_gradients(tiny_llama):
    """Logits and every gradient of a packed row (documents of 1 to 40 tokens, grouped-query heads) match
    transformers' sdpa with its block-diagonal mask, in float32."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa")
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    ids, pos = packed_row([17, 1, 40, 9, 33], model.config.vocab_size)
    ref_logits, ref_grads = forward_backward(model, ids, pos)
    assert use_packed_attention(model)
    assert model.config._attn_implementation == NAME
    logits, grads = forward_backward(model, ids, pos)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # and documents stay apart: the last document alone gives the same logits
    alone = model(input_ids=ids[:, -33:], use_cache=False).logits.detach()
    torch.testing.assert_close(logits[:, -33:], alone, rtol=1e-5, atol=1e-5)


def test_other_cases_go_to_sdpa_unchanged(tiny_llama):
    """A padded batch of two rows and cached generation give what sdpa gives."""
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").eval()
    ours = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").eval()
    assert use_packed_attention(ours)
    ids = torch.randint(3, ref.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        torch.testing.assert_close(
            ours(input_ids=ids, attention_mask=mask).logits, ref(input_ids=ids, attention_mask=mask).logits
        )
        kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(ours.generate(ids, attention_mask=mask, **kw), ref.generate(ids, attention_mask=mask, **kw))


def test_a_model_not_on_sdpa_is_left_alone(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="eager")
    assert not use_packed_attention(model)
    assert model.config._attn_implementation == "eager"


def trained(tiny_llama, root, name, **sections):
    body = tiny_recipe(tiny_llama, TIDES, **sections)
    # alpha 2r (scale 2): these compare two ways of computing one run, which the default scale (32 / r = 8) at the
    # tiny model's high learning rates makes chaotic enough that float rounding alone moves the loss by 1e-3
    body["lora"] = {**body["lora"], "alpha": 2 * body["lora"]["r"]}
    body["output"] = {"name": name, "store": str(root / "adapters"), "runs_dir": str(root / "runs")}
    lines = []
    result = train(validate_recipe(body, name), say=lines.append)
    return result, "\n".join(lines)


def test_training_on_the_cpu_uses_it_and_learns_the_same(tiny_llama, tmp_path):
    """The same recipe with `attn_implementation: sdpa` (masked attention) gives the same losses, float32."""
    auto, said = trained(tiny_llama, tmp_path, "auto")
    assert "attention per-document sdpa" in said and auto.meta.plan.attn_implementation == "per-document sdpa"
    masked, said_masked = trained(tiny_llama, tmp_path, "masked", base_model={"attn_implementation": "sdpa"})
    assert "attention sdpa" in said_masked and masked.meta.plan.attn_implementation == "sdpa"
    assert auto.metrics["train_loss"] == pytest.approx(masked.metrics["train_loss"], rel=1e-4)
    assert auto.metrics["eval_loss_after"] == pytest.approx(masked.metrics["eval_loss_after"], rel=1e-4)


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_bf16_training_holds_frozen_weights_in_bf16_and_saves_a_float32_adapter(tiny_llama, tmp_path, quantization):
    """precision bf16 with base_model.dtype auto: the frozen base is held in bf16 (autocast would round each weight
    to bf16 at every use anyway; a 4-bit base keeps its embeddings and norms in bf16); the adapter is still
    trained and saved in float32, and the run learns as much as one with the base held in float32."""
    bf16 = {"precision": "bf16", "max_steps": 16, "learning_rate": 3e-2}
    q = {"quantization": quantization}
    held, said = trained(tiny_llama, tmp_path, "held", train=bf16, base_model=q)
    assert "frozen base weights held in bf16" in said
    full, said_full = trained(tiny_llama, tmp_path, "full", train=bf16, base_model={**q, "dtype": "float32"})
    assert "frozen base weights held in bf16" not in said_full
    tensors = load_file(held.path / "adapter_model.safetensors")
    assert tensors and {t.dtype for t in tensors.values()} == {torch.float32}
    before = held.metrics["eval_loss_before"]
    assert held.metrics["eval_loss_before"] == pytest.approx(full.metrics["eval_loss_before"], rel=1e-3)
    assert held.metrics["eval_loss_after"] < before - 0.1
    assert held.metrics["eval_loss_after"] == pytest.approx(full.metrics["eval_loss_after"], rel=1e-3)


def test_pad_packed_row_adds_one_unsupervised_document():
    row = {
        "input_ids": torch.tensor([[5, 6, 7, 8, 9]]),
        "labels": torch.tensor([[5, 6, -100, 8, 9]]),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1]]),
    }
    out = pad_packed_row(row, 8, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert out["labels"].tolist() == [[5, 6, -100, 8, 9, -100, -100, -100]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert document_spans(out["position_ids"], 8) == [(0, 3), (3, 5), (5, 8)]
    assert pad_packed_row(out, 8, pad_id=0) is out  # already a multiple
    two_rows = {k: v.repeat(2, 1) for k, v in row.items()}
    assert pad_packed_row(two_rows, 8, pad_id=0) is two_rows  # only one-row packed batches
