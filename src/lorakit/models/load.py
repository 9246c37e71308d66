"""Loading a base model's weights: dtype, bitsandbytes quantization, device placement."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from lorakit.errors import LorakitError, short
from lorakit.models.reference import ModelRef
from lorakit.plan import PER_DOCUMENT, Plan


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def quantization_config(plan: Plan):
    from transformers import BitsAndBytesConfig

    if plan.quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=plan.quant_type,
            bnb_4bit_use_double_quant=plan.double_quant,
            bnb_4bit_compute_dtype=torch_dtype(plan.compute_dtype),
            bnb_4bit_quant_storage=torch.uint8,
        )
    if plan.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def placement(plan: Plan, sharded: bool = False) -> dict | str | None:
    """transformers' `device_map` for the Plan: weights straight onto their GPU (no copy in CPU memory first),
    "auto" across GPUs and the CPU, or None (the CPU; or FSDP/DeepSpeed, which place the shards themselves).
    A quantized model always goes to its device at load: bitsandbytes quantizes there."""
    if plan.device_map == "auto":
        return "auto"
    if plan.on_gpu and not sharded:
        return {"": int(plan.device.split(":")[1])}
    if plan.quantization != "none":
        return {"": "cpu"}
    return None


def load_model(ref: ModelRef, plan: Plan, trust_remote_code: bool = False, sharded: bool = False):
    """Load the base model as the Plan says: its dtype, quantization, attention and device.

    Every verb loads its base through here (training through `training.run`, the others through the one loader
    in `store.loader`); `sharded`: FSDP/DeepSpeed training, where accelerate places the weights."""
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": torch_dtype(plan.weights_dtype), "trust_remote_code": trust_remote_code, **ref.load_args}
    if plan.attn_implementation not in (None, PER_DOCUMENT):  # per-document attention is switched on after load
        kwargs["attn_implementation"] = plan.attn_implementation
    if plan.quantization != "none":
        kwargs["quantization_config"] = quantization_config(plan)
    device_map = placement(plan, sharded)
    if device_map is not None:
        kwargs["device_map"] = device_map
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(ref.path, **kwargs)
    except SafetensorError as e:
        files = ", ".join(sorted(f.name for f in Path(ref.path).glob("*.safetensors"))) or "weights"
        raise LorakitError(
            f"{ref.label}: {files} unreadable ({short(e)}); the file is damaged or incomplete: "
            "download or convert the model again"
        ) from None
    except (OSError, ValueError, RuntimeError) as e:
        raise LorakitError(f"could not load model {ref.label}: {short(e)}") from None
    if getattr(model.config, "quantization_config", None) is not None and ref.gguf_file:
        del model.config.quantization_config
    if plan.quantization != "none":
        release_checkpoint_map(model)
    return model


def release_checkpoint_map(model) -> int:
    """Copy the weights a quantized model left in the memory-mapped checkpoint into memory of its own.

    transformers keeps weights it does not convert (embeddings, norms: already in the loading dtype) as views of
    the checkpoint's memory map, and the map keeps every page read while quantizing resident: the whole
    full-precision checkpoint stays in the process's memory for the whole run (measured on SmolLM2-135M: 410 MB
    of a 517 MB checkpoint, next to a 160 MB quantized model). Copying the few unconverted weights lets the map go.
    Returns the number of tensors copied.
    """
    copied = 0
    # parameters() and buffers() each yield a shared tensor once; `.data =` swaps the storage in place, so the
    # module (and any module tying the same tensor) keeps the same Parameter or buffer object.
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.is_floating_point() and t.device.type == "cpu":
            t.data = t.data.clone()
            copied += 1
    return copied
