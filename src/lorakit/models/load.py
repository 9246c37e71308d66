"""Loading a base model's weights: dtype, bitsandbytes quantization, device placement."""

from __future__ import annotations

import itertools
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
    copied = 0
    # parameters() and buffers() each yield a shared tensor once; `.data =` swaps the storage in place, so the
    # module (and any module tying the same tensor) keeps the same Parameter or buffer object.
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.is_floating_point() and t.device.type == "cpu":
            t.data = t.data.clone()
            copied += 1
    return copied
