"""Training memory: the chunked LM-head loss equals the model's own loss and gradients without holding the full
logits; a quantized base keeps no full-precision checkpoint mapped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import RECIPES, cpu_plan, load_on_cpu, make_tiny_llama, tiny_recipe
from lorakit.data.prepare import prepare
from lorakit.models.architecture import choose_targets
from lorakit.models.reference import resolve
from lorakit.models.tokenizer import load_tokenizer
from lorakit.recipe import validate_recipe
from lorakit.training.attention import ROW_MULTIPLE, use_packed_attention
from lorakit.training.loss import chunked_loss_parts
from lorakit.training.trainer import build_lora_config, build_sft_config, sft_trainer_class

TIDES = RECIPES / "data" / "tides.txt"


@pytest.fixture(scope="module")
def untied_llama(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama-untied"), tie=False)


@pytest.fixture(params=["tiny_llama", "untied_llama", "tiny_gpt2"])
def model_dir(request):
    return request.getfixturevalue(request.param)


def build_trainer(model_dir, tmp_path, **lora):
    """lorakit's trainer on a tiny model, packed padding-free; random LoRA B, so every LoRA weight has a gradient."""
    r = validate_recipe(tiny_recipe(model_dir, TIDES, lora={"dropout": 0.0, **lora}), "test")
    tok = load_tokenizer(resolve(str(model_dir)))
    train_ds, _ = prepare(r.data, tok, 0).datasets()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    targets, fan = choose_targets(model, "auto")
    trainer = sft_trainer_class()(
        model=model,
        args=build_sft_config(r, tmp_path, cpu_plan(r, targets, fan), has_eval=False),
        train_dataset=train_ds,
        processing_class=tok,
        peft_config=build_lora_config(r, cpu_plan(r, targets, fan)),
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    trainer.model.eval()  # no dropout (GPT-2 has some in its blocks): two forwards must see the same model
    return trainer


def batches(trainer, count: int, size: int = 3):
    """Packed batches exactly as training sees them: one padding-free row, position_ids restarting per document."""
    rows = [trainer.train_dataset[i] for i in range(count * size)]
    out = [trainer.data_collator(rows[i * size : (i + 1) * size]) for i in range(count)]
    assert "attention_mask" not in out[0] and (out[0]["position_ids"] == 0).sum() > 1
    return out


def lora_grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def reference(model, batch, num_items_in_batch=None):
    """The model's own loss: transformers' forward with labels."""
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    keep = ("input_ids", "position_ids", "labels")
    return model(**{k: batch[k] for k in keep}, use_cache=False, **extra).loss


@pytest.mark.parametrize("packed", [False, True], ids=["sdpa", "per-document-padded"])
def test_loss_and_lora_gradients_equal_the_models_own(model_dir, tmp_path, monkeypatch, packed):
    """Also in chunks of 16 rows (the last one partial, padded with zero rows), and with the packed row padded to a
    multiple of 64 tokens and attention per document (what CPU training runs)."""

    trainer = build_trainer(model_dir, tmp_path)
    assert trainer.chunked_head is not None
    model = trainer.model
    monkeypatch.setattr("lorakit.training.loss.CHUNK_LOGITS", 16 * model.get_output_embeddings().weight.shape[0])
    (batch,) = batches(trainer, 1)
    assert (batch["labels"] != -100).sum() % 16 != 0  # a partial last chunk
    if packed:
        if not use_packed_attention(model):
            pytest.skip("this model's attention does not go through transformers' attention interface")
        trainer.row_multiple = ROW_MULTIPLE
        keep = ("input_ids", "labels", "position_ids")  # the row less 5 tokens: the padding has to round it up
        batch = {k: batch[k][:, :-5] for k in keep}
    ours = trainer.compute_loss(model, dict(batch))
    ours.backward()
    ours_grads = lora_grads(model)
    ref = reference(model, batch)
    ref.backward()
    ref_grads = lora_grads(model)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    assert ours_grads.keys() == ref_grads.keys() and len(ours_grads) > 0
    for name, grad in ref_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(ours_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_gradient_accumulation_with_num_items_in_batch(tiny_llama, tmp_path):
    """Two micro-batches normalised by the tokens of both, as Trainer does: same losses, same summed gradients."""
    trainer = build_trainer(tiny_llama, tmp_path)
    model = trainer.model
    micro = batches(trainer, 2)
    items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    items = torch.tensor(items)
    ours = [trainer.compute_loss(model, dict(b), num_items_in_batch=items) for b in micro]
    sum(ours).backward()
    ours_grads = lora_grads(model)
    refs = [reference(model, b, items) for b in micro]
    sum(refs).backward()
    ref_grads = lora_grads(model)
    for a, b in zip(ours, refs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_bf16_autocast_computes_the_head_like_the_model(tiny_llama, tmp_path):
    """Under autocast the chunks run in bf16, as the model's head does; the result matches to bf16 precision."""
    trainer = build_trainer(tiny_llama, tmp_path)
    model = trainer.model
    (batch,) = batches(trainer, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = trainer.compute_loss(model, dict(batch))
        ref = reference(model, batch)
    ours.backward()
    ours_grads = lora_grads(model)
    ref.backward()
    ref_grads = lora_grads(model)
    torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-3)
    flat = torch.cat([g.flatten() for g in ours_grads.values()])
    flat_ref = torch.cat([g.flatten() for g in ref_grads.values()])
    assert (flat - flat_ref).norm() / flat_ref.norm() < 2e-2


def test_full_logits_are_never_saved(tiny_llama, tmp_path, monkeypatch):
    """With chunks smaller than the batch, no tensor kept for the backward is [tokens, vocabulary] or larger."""

    trainer = build_trainer(tiny_llama, tmp_path)
    (batch,) = batches(trainer, 1)
    vocab = trainer.chunked_head[1].weight.shape[0]
    tokens = batch["input_ids"].numel()
    monkeypatch.setattr("lorakit.training.loss.CHUNK_LOGITS", 16 * vocab)  # chunks of 16 rows
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    assert tokens > 16 and max(saved) < tokens * vocab


def test_trainable_or_rescaled_heads_keep_the_models_own_loss(tiny_llama, tmp_path):
    trainer = build_trainer(tiny_llama, tmp_path, modules_to_save=["lm_head"])
    assert trainer.chunked_head is None  # a trained head needs its own gradient

    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, head_dim=8,
                          num_attention_heads=2, num_key_value_heads=1, final_logit_softcapping=0.01)  # fmt: skip
    gemma = Gemma2ForCausalLM(config)
    gemma.requires_grad_(False)
    assert chunked_loss_parts(gemma) is None  # soft-capped logits are not head(body(x))
    config.final_logit_softcapping = None
    assert chunked_loss_parts(Gemma2ForCausalLM(config).requires_grad_(False)) is not None


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's memory maps (Linux)")
def test_quantized_base_keeps_no_checkpoint_mapped(tiny_llama):
    """transformers leaves unquantized weights as views of the memory-mapped checkpoint; lorakit copies them out."""
    import gc

    section = validate_recipe(tiny_recipe(tiny_llama, TIDES, base_model={"quantization": "4bit"}), "t").base_model
    model = load_on_cpu(tiny_llama, section, "bfloat16")
    gc.collect()
    checkpoint = str((tiny_llama / "model.safetensors").resolve())
    assert not [line for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(checkpoint)]
    ids = torch.randint(3, 500, (1, 8), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(model(input_ids=ids).logits).all()  # the copied weights are the model's own
