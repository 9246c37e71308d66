"""A model's architecture without its weights: config, module tree on the meta device, LoRA target modules."""

from __future__ import annotations

import sys

import torch
from torch import nn

from lorakit.errors import LorakitError, short
from lorakit.models.reference import ModelRef
from lorakit.recipe import BaseModelSection


def linear_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    types: list[type] = [nn.Linear, Conv1D]
    # A model holds bitsandbytes layers only once bitsandbytes is imported (it quantized the model): importing it
    # just to inspect a full-precision or meta-device model would cost 1.7 s of every dry run.
    bnb = sys.modules.get("bitsandbytes")
    if bnb is not None:
        types += [bnb.nn.Linear4bit, bnb.nn.Linear8bitLt]
    return tuple(types)


def load_config(ref: ModelRef, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(ref.path, trust_remote_code=trust_remote_code, **ref.load_args)
    except (OSError, ValueError, KeyError) as e:
        raise LorakitError(f"could not load the model config of {ref.label}: {short(e)}") from None
    if hasattr(config, "quantization_config") and ref.gguf_file:
        del config.quantization_config
    return config


def skeleton(ref: ModelRef, trust_remote_code: bool = False, config=None) -> nn.Module:
    """The model's module tree on the meta device: no memory, no weights read (`config`: instead of the model's own,
    e.g. one with fewer layers)."""
    from transformers import AutoModelForCausalLM

    config = config if config is not None else load_config(ref, trust_remote_code)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise LorakitError(f"{ref.path} is not a causal language model: {short(e)}") from None


# Config keys of models whose decoder layers differ in what they hold (dense and mixture-of-experts layers mixed):
# these are planned with every layer built, the others from one- and two-layer copies.
MIXED_LAYER_KEYS = ("first_k_dense_replace", "mlp_only_layers", "decoder_sparse_step", "moe_layer_freq",
                    "dense_layers", "moe_layers", "layers_block_type", "hybrid_override_pattern")  # fmt: skip


def layer_count(config) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", 0)
    return n if isinstance(n, int) else 0


def repeated_layers(config) -> bool:
    """Whether every decoder layer holds the same modules (so one layer's size stands for each)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return layer_count(config) > 2 and not any(getattr(text, k, None) not in (None, [], 0) for k in MIXED_LAYER_KEYS)


def with_layers(config, n: int):
    """A copy of the config with `n` decoder layers (per-layer lists cut to match)."""
    copy = config.__class__.from_dict(config.to_dict())
    text = copy.get_text_config() if hasattr(copy, "get_text_config") else copy
    text.num_hidden_layers = n
    types = getattr(text, "layer_types", None)
    if isinstance(types, list | tuple) and len(types) > n:
        text.layer_types = list(types[:n])
    return copy


def linear_modules(model: nn.Module) -> dict[str, str]:
    """Leaf linear layers of the blocks: full name -> class name (the output head excluded)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    types = linear_types()
    return {
        name: type(mod).__name__
        for name, mod in model.named_modules()
        if isinstance(mod, types) and mod is not head and name
    }


def choose_targets(model: nn.Module, spec: str | list[str]) -> tuple[list[str] | str, bool]:
    """Resolve `lora.target_modules` against a model: (names for LoraConfig, fan_in_fan_out)."""
    layers = linear_modules(model)
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in layers})
    if spec == "all-linear":
        chosen = list(layers)
    elif spec == "auto":
        if not suffixes:
            raise LorakitError("found no linear layers to adapt in this model")
        chosen = list(layers)
        spec = suffixes
    else:
        missing = [t for t in spec if not any(n == t or n.endswith("." + t) for n in layers)]
        if missing:
            raise LorakitError(
                f"lora.target_modules: {', '.join(missing)} match no layer of this model; "
                f"candidates: {', '.join(suffixes)}"
            )
        chosen = [n for n in layers if any(n == t or n.endswith("." + t) for t in spec)]
    fan_in_fan_out = any(layers[n] == "Conv1D" for n in chosen)
    return spec, fan_in_fan_out


def check_quantizable(model: nn.Module, section: BaseModelSection) -> None:
    if section.quantization == "none":
        return
    conv = [n for n, t in linear_modules(model).items() if t == "Conv1D"]
    if conv:
        raise LorakitError(
            f"base_model.quantization {section.quantization}: bitsandbytes cannot quantize this model's "
            f"Conv1D layers ({conv[0]}, ... {len(conv)} in all; GPT-2 style). Use quantization: none "
            "(GPT-2 sizes fit in memory in full precision) or a model built from nn.Linear layers."
        )
    if section.quantization in {"4bit", "8bit"}:
        try:
            import bitsandbytes  # noqa: F401
        except Exception as e:
            raise LorakitError(f"quantization {section.quantization} needs bitsandbytes, which failed: {e}") from None
