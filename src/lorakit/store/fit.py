"""Does an adapter's content fit? Its adapter_config.json read with the types PEFT needs, its weights file read
from the safetensors header alone (names and shapes, no tensor data), and every tensor matched against a module
of the base model it is about to be attached to.

PEFT attaches an adapter by module name: a tensor whose name matches no module is skipped with a warning, so an
adapter made for another model loads "fine" and generates the base model's text under its name. A tensor of the
wrong shape stops PEFT with a size-mismatch traceback. Both are refused here first, with the modules named."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError, short

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# lora_A / lora_B of linear layers (".weight", or ".bias" with lora_bias), the embedding pair, DoRA's magnitude
PARTS = "lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector"
LORA_KEY = re.compile(rf"^(?P<module>.+)\.(?P<part>{PARTS})(?:\.(?:weight|bias))?$")
SHOWN = 4  # problems listed in a message; the rest counted


def read_peft_config(path: Path) -> dict[str, Any]:
    """An adapter folder's adapter_config.json, with the fields lorakit and PEFT rely on of the right type."""
    file = Path(path) / CONFIG_FILE
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except OSError as e:
        raise LorakitError(f"{file}: cannot read it ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise LorakitError(f"{file}: not valid JSON") from None
    if not isinstance(config, dict):
        raise LorakitError(f"{file}: expected a JSON object, got a {type(config).__name__}")
    checks = {
        "peft_type": lambda v: v is None or isinstance(v, str),
        "r": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v > 0),
        "lora_alpha": lambda v: v is None or (isinstance(v, int | float) and not isinstance(v, bool)),
        "target_modules": lambda v: v is None or isinstance(v, str) or _strings(v),
        "modules_to_save": lambda v: v is None or _strings(v),
        "rank_pattern": lambda v: v is None or isinstance(v, dict),
        "alpha_pattern": lambda v: v is None or isinstance(v, dict),
        "base_model_name_or_path": lambda v: v is None or isinstance(v, str),
    }
    for key, ok in checks.items():
        if not ok(config.get(key)):
            raise LorakitError(f"{file}: {key} has the wrong type or value ({json.dumps(config.get(key))[:60]})")
    return config


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def tensor_shapes(path: Path, name: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in an adapter's weights file, from its header (no tensor data is read).

    A truncated or damaged file is refused here, whatever reads it next (generate, merge, export)."""
    from safetensors import safe_open

    file = Path(path) / WEIGHTS_FILE
    try:
        with safe_open(str(file), framework="numpy") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except OSError as e:
        raise LorakitError(f"adapter {name!r}: cannot read {file} ({e.strerror or e})") from None
    except Exception as e:  # safetensors' SafetensorError: a header or size that does not add up
        raise LorakitError(
            f"adapter {name!r}: {file.name} is damaged or not a safetensors file ({short(e)}); copy or train it again"
        ) from None
    if not shapes:
        raise LorakitError(f"adapter {name!r}: {file.name} holds no tensors")
    return shapes


def expected(module, part: str, rank: int) -> tuple[int, ...] | None:
    """The shape `part` (lora_A, lora_B, ...) must have on `module` at rank `rank` (None: not a layer LoRA adapts)."""
    import torch.nn as nn

    if isinstance(module, nn.Embedding):
        n, d = module.num_embeddings, module.embedding_dim
        return {"lora_embedding_A": (rank, n), "lora_embedding_B": (d, rank)}.get(part)
    if hasattr(module, "in_features") and hasattr(module, "out_features"):  # nn.Linear and the quantized ones
        n_in, n_out = module.in_features, module.out_features
    elif hasattr(module, "nx") and hasattr(module, "nf"):  # transformers' Conv1D (GPT-2)
        n_in, n_out = module.nx, module.nf
    else:
        return None
    return {"lora_A": (rank, n_in), "lora_B": (n_out, rank), "lora_magnitude_vector": (n_out,)}.get(part)


def check_fits(model, adapter_path: Path, name: str, base: str) -> None:
    """Refuse adapter `name` unless each of its tensors names a module or parameter of `model` (the base, real or
    on the meta device) with the shape that module needs, at one rank per module."""
    config = read_peft_config(adapter_path)
    if config.get("peft_type") not in (None, "LORA"):
        raise LorakitError(f"adapter {name!r} is a {config.get('peft_type')} adapter; lorakit loads LoRA adapters")
    shapes = tensor_shapes(adapter_path, name)
    modules = dict(model.named_modules())
    # every name a weight goes by: a tied head's weight is the embedding's, listed under both names
    params = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    problems, matched, ranks = [], 0, {}
    for key, shape in shapes.items():
        body = key.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")  # PEFT saves a wrapped layer's own
        m = LORA_KEY.match(body)
        if m is None:  # a whole layer saved with the adapter (modules_to_save, trainable tokens)
            if body not in params:
                problems.append(f"{body}: no such parameter in the base")
            elif params[body] != shape:
                problems.append(f"{body}: {list(shape)} in the adapter, {list(params[body])} in the base")
            else:
                matched += 1
            continue
        module_name, part = m["module"], m["part"]
        module = modules.get(module_name)
        if module is None:
            problems.append(f"{module_name}: no such module in the base")
            continue
        if len(shape) != (1 if part == "lora_magnitude_vector" or key.endswith(".bias") else 2):
            problems.append(f"{module_name}.{part}: a tensor of shape {list(shape)}")
            continue
        rank = shape[0] if part in ("lora_A", "lora_embedding_A") else shape[-1]
        rank = ranks.setdefault(module_name, rank) if part != "lora_magnitude_vector" else ranks.get(module_name, 0)
        want = expected(module, part, rank)
        if want is None:
            problems.append(f"{module_name}: a {type(module).__name__}, which LoRA does not adapt")
        elif key.endswith(".bias") and part == "lora_B":
            matched += 1  # lora_bias: the bias of lora_B, one value per output
        elif shape != want:
            problems.append(f"{module_name}.{part}: {list(shape)} in the adapter, {list(want)} for this base")
        else:
            matched += 1
    declared = config.get("r")
    if declared and not config.get("rank_pattern") and ranks and set(ranks.values()) != {declared}:
        found = ", ".join(str(r) for r in sorted(set(ranks.values())))
        problems.insert(0, f"adapter_config.json says r={declared}, the weights have rank {found}")
    if problems:
        listed = "; ".join(problems[:SHOWN]) + (f" (and {len(problems) - SHOWN} more)" if len(problems) > SHOWN else "")
        if not matched:
            raise LorakitError(
                f"adapter {name!r} does not belong to base model {base}: none of its tensors fits a module of it "
                f"({listed}); it was made for another model"
            )
        raise LorakitError(f"adapter {name!r} does not fit base model {base}: {listed}")
