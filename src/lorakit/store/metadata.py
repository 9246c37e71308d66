"""lorakit.json: what an adapter records about itself (recipe, plan, base model, data, metrics, versions)."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lorakit.data.formats import prompt_style
from lorakit.errors import LorakitError
from lorakit.recipe import Recipe

META_FILE = "lorakit.json"
REQUIRED = ("adapter_config.json", "adapter_model.safetensors")


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("lorakit", "torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def method_name(recipe: Recipe) -> str:
    kind = "DoRA" if recipe.lora.use_dora else "LoRA"
    return {"4bit": "QLoRA", "8bit": f"{kind} (8-bit base)"}.get(recipe.base_model.quantization, kind)


def build_meta(recipe, ref, config, tokenizer, trainable, data, plan, metrics) -> dict[str, Any]:
    """lorakit.json: everything needed to use, reproduce and check this adapter."""
    return {
        "name": recipe.adapter_name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": method_name(recipe),
        "recipe": recipe.model_dump(mode="json"),
        "base_model": {
            "reference": recipe.base_model.name,
            "kind": ref.kind,
            "path": ref.path,
            "gguf_file": ref.gguf_file,
            "architecture": (config.architectures or [config.model_type])[0],
            "quantization": recipe.base_model.quantization,
        },
        "tokenizer": {
            "eos_token": tokenizer.eos_token,
            "pad_token": tokenizer.pad_token,
            "chat_template": tokenizer.chat_template,
            "prompt_style": prompt_style(tokenizer, {s.format for s in recipe.data.sources}),
        },
        "target_modules": list(plan.target_modules),
        "lora_alpha": plan.lora_alpha,
        "trainable_params": trainable,
        "data": dict(data.report),
        "plan": plan.model_dump(mode="json"),
        "metrics": metrics,
        "seed": recipe.train.seed,
        "recipe_hash": "sha256:"
        + hashlib.sha256(recipe.model_dump_json(exclude={"output": {"store", "runs_dir"}}).encode()).hexdigest(),
        "versions": versions(),
    }


def check_consistent(path: Path, meta: dict[str, Any]) -> None:
    """The PEFT config on disk must be the one lorakit recorded (rank and target modules)."""
    try:
        config = json.loads((path / REQUIRED[0]).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LorakitError(f"{path / REQUIRED[0]}: unreadable") from None
    recorded_r = meta.get("recipe", {}).get("lora", {}).get("r")
    if recorded_r is not None and config.get("r") != recorded_r:
        raise LorakitError(
            f"adapter {path.name!r}: adapter_config.json has r={config.get('r')} but lorakit.json recorded "
            f"r={recorded_r}; the files do not belong together"
        )
    recorded_t = meta.get("target_modules")
    on_disk = config.get("target_modules")
    if (
        recorded_t
        and on_disk is not None
        and sorted(recorded_t) != sorted(on_disk if isinstance(on_disk, list) else [on_disk])
    ):
        raise LorakitError(
            f"adapter {path.name!r}: adapter_config.json has target_modules {on_disk} but lorakit.json recorded "
            f"{recorded_t}; the files do not belong together"
        )


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    tmp = path / f".{META_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    tmp.replace(path / META_FILE)
