"""Loading a base model's weights: dtype, bitsandbytes quantization, device placement."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lorakit.errors import LorakitError, short
from lorakit.models.reference import ModelRef
from lorakit.recipe import BaseModelSection


def device() -> torch.device:
    """The device this process trains on (the local rank's GPU under torchrun/accelerate)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_dtype(section: BaseModelSection, dev: torch.device) -> torch.dtype:
    if section.dtype != "auto":
        return torch_dtype(section.dtype)
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantization_config(section: BaseModelSection, compute: torch.dtype):
    from transformers import BitsAndBytesConfig

    if section.quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=section.quant_type,
            bnb_4bit_use_double_quant=section.double_quant,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_storage=torch.uint8,
        )
    if section.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_model(ref: ModelRef, section: BaseModelSection, compute: torch.dtype | None = None, dev=None):
    """Load the base model; quantized models go straight to their device (no full-precision copy)."""
    from transformers import AutoModelForCausalLM

    dev = dev or device()
    dtype = resolve_dtype(section, dev)
    kwargs: dict = {"dtype": dtype, "trust_remote_code": section.trust_remote_code, **ref.load_args}
    if section.attn_implementation != "auto":
        kwargs["attn_implementation"] = section.attn_implementation
    if section.quantization != "none":
        kwargs["quantization_config"] = quantization_config(section, compute or dtype)
        kwargs["device_map"] = {"": dev.index if dev.type == "cuda" else "cpu"}
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
    if section.quantization != "none":
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
    seen: set[int] = set()
    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for t in tensors.values():
                if t is None or id(t) in seen or not t.is_floating_point() or t.device.type != "cpu":
                    continue
                seen.add(id(t))
                t.data = t.data.clone()
    return len(seen)


def keep_4bit_trainable_on_cpu(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    bitsandbytes 0.50 repacks a Linear4bit's weights on the first no-grad forward in eval mode on
    a CPU with AVX512-BF16 (an evaluation, say); the kernel it then uses for every later forward,
    training included, has no backward, so gradients through the base are silently wrong
    (measured: a QLoRA run that evaluated first learned about a tenth as much). Returns the
    number of layers changed.
    """
    try:
        import bitsandbytes as bnb
    except Exception:
        return 0
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    return len(layers)
