"""How training uses the hardware: the dtypes peft's and bitsandbytes' layers answer in under autocast
(lorakit.internals), the adapter's dtype and the CPU kernel cache (lorakit.training.runtime)."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import RECIPES, load_on_cpu, tiny_recipe
from lorakit.internals import keep_lora_inputs_as_they_come, quantized_outputs_in_compute_dtype
from lorakit.recipe import validate_recipe
from lorakit.training.runtime import adapter_in_float32, bound_cpu_kernel_cache

TIDES = RECIPES / "data" / "tides.txt"


def test_lora_inputs_are_not_cast_to_float32_under_autocast(tiny_llama):
    """peft casts a LoRA layer's input to the adapter's dtype; under autocast that copy is cast straight back.
    Without it the forward under bf16 autocast gives the same logits."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids = torch.randint(3, base.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(input_ids=ids).logits
        changed = keep_lora_inputs_as_they_come(model)
        after = model(input_ids=ids).logits
    lora_layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert changed == len(lora_layers) > 0
    assert not any(m.cast_input_dtype_enabled for m in lora_layers)
    torch.testing.assert_close(after, before)


def qlora_model(tiny_llama):
    """The tiny Llama in 4-bit NF4 (bf16 compute) as lorakit loads it, with a LoRA adapter that is not zero."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    section = validate_recipe(tiny_recipe(tiny_llama, TIDES, base_model={"quantization": "4bit"}), "t").base_model
    base = load_on_cpu(tiny_llama, section, "bfloat16")
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    torch.manual_seed(0)
    return get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))


def test_4bit_layer_answers_in_its_compute_dtype_under_autocast_only(tiny_llama):
    """The hooked layer's answer under autocast is bitsandbytes' own (computed in bf16), without the cast back to
    float32; outside autocast the layer is untouched."""
    import bitsandbytes as bnb

    model = qlora_model(tiny_llama)
    layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    x = torch.randn(1, 7, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reference = layer(x)
        plain = layer(x)
        assert quantized_outputs_in_compute_dtype(model) == 14  # 7 projections x 2 layers
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hooked = layer(x)
        unchanged = layer(x)
    assert reference.dtype == torch.float32 and hooked.dtype == torch.bfloat16
    assert torch.equal(hooked, reference.to(torch.bfloat16))  # the same bf16 matmul, not cast back up
    assert unchanged.dtype == torch.float32 and torch.equal(unchanged, plain)


def test_qlora_step_under_autocast_matches_the_float32_path(tiny_llama):
    """A QLoRA forward and backward under bf16 autocast: with the hooks the MLP runs in bf16 (as a LoRA model's
    does under autocast), the loss and the adapter's gradients agree with peft + bitsandbytes' float32 path
    within bf16 rounding."""
    model = qlora_model(tiny_llama)
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    mlp = model.get_base_model().model.layers[0].mlp
    seen = {}
    mlp.register_forward_hook(lambda m, a, out: seen.update(dtype=out.dtype))

    def step():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        return loss.detach(), grads, seen["dtype"]

    loss_ref, grads_ref, dtype_ref = step()
    keep_lora_inputs_as_they_come(model)
    quantized_outputs_in_compute_dtype(model)
    loss, grads, dtype = step()
    assert dtype_ref == torch.float32 and dtype == torch.bfloat16
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-2)
    cosine = torch.nn.functional.cosine_similarity(grads, grads_ref, dim=0)
    assert cosine > 0.99
    assert (grads - grads_ref).norm() < 0.1 * grads_ref.norm()


def test_nothing_to_hook_without_4bit_layers(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert quantized_outputs_in_compute_dtype(model) == 0


def test_cpu_kernel_cache_is_bounded_unless_the_user_set_it(monkeypatch):
    monkeypatch.delenv("LRU_CACHE_CAPACITY", raising=False)
    bound_cpu_kernel_cache()
    assert os.environ["LRU_CACHE_CAPACITY"] == "64"
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "8")
    bound_cpu_kernel_cache()
    assert os.environ["LRU_CACHE_CAPACITY"] == "8"


def test_adapter_weights_are_held_in_float32():
    """TRL casts a quantized model's trainable LoRA weights to bf16; lorakit casts them back, frozen ones stay."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)).to(torch.bfloat16)
    model[0].requires_grad_(False)
    assert adapter_in_float32(model) == 2  # weight and bias of the trainable layer
    assert {p.dtype for p in model[1].parameters()} == {torch.float32}
    assert {p.dtype for p in model[0].parameters()} == {torch.bfloat16}
    assert adapter_in_float32(model) == 0
