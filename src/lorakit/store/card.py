"""The model card (README.md) written into every adapter folder."""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

import yaml

from lorakit.store.metadata import AdapterMeta

HUB_KINDS = ("hub", "embedded")  # bases another machine can fetch by name
LICENSES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0"}  # the bases whose license lorakit knows


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def shown(path: str | None) -> str:
    """A path as the card shows it: relative as written, or just the name of an absolute one (no machine's paths)."""
    if not path:
        return "?"
    return PurePath(path).name if PurePath(path).is_absolute() else path


def hub_base(meta: AdapterMeta) -> str | None:
    """The base's hub id, when it has one."""
    base = meta.base_model
    return base.portable_id if base.kind in HUB_KINDS and base.portable_id else None


def front_matter(meta: AdapterMeta) -> str:
    """The YAML header the Hub and PEFT read: base model, library, tags, license where known."""
    hub = hub_base(meta)
    head: dict[str, Any] = {}
    if hub:
        head["base_model"] = hub
    head["library_name"] = "peft"
    if hub in LICENSES:
        head["license"] = LICENSES[hub]
    head["pipeline_tag"] = "text-generation"
    head["tags"] = [*([f"base_model:adapter:{hub}"] if hub else []), meta.method.lower(), "lorakit", "transformers"]
    return "---\n" + yaml.safe_dump(head, sort_keys=False) + "---\n"


def versions(meta: AdapterMeta) -> str:
    v = meta.versions
    pairs = [("lorakit", v.lorakit), ("torch", v.torch), ("transformers", v.transformers), ("peft", v.peft),
             ("trl", v.trl)]  # fmt: skip
    return ", ".join(f"{k} {x}" for k, x in pairs if x)


def model_card(name: str, meta: AdapterMeta, curve: str | None = None) -> str:
    """The adapter's README.md; `curve`: the loss-curve picture in its folder, embedded when given."""
    lora, base, metrics = meta.recipe.lora, meta.base_model, meta.metrics
    hub = hub_base(meta)
    called = hub or shown(base.reference)
    lines = [
        front_matter(meta),
        f"# {name}",
        "",
        f"A {meta.method} adapter for `{called}`, trained with lorakit {meta.versions.lorakit or ''}.",
        *(
            [
                "",
                f"Trained on weights converted from {base.converted_from}: on the original weights of `{called}` "
                "it behaves close to, not exactly as, it did in training.",
            ]
            if base.converted_from
            else []
        ),
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{called}` ({base.architecture}) |",
        f"| base weights | `{base.fingerprint}` |",
        f"| rank / alpha | {lora.r} / {meta.lora_alpha} |",
        f"| learning rate | {meta.learning_rate_text()} |",
        f"| target modules | {', '.join(meta.target_modules)} |",
        f"| trainable parameters | {_fmt('?' if meta.trainable_params is None else meta.trainable_params)} |",
        f"| steps / tokens | {metrics.steps} / {metrics.train_tokens_seen} |",
        f"| eval loss before → after | {_fmt(metrics.eval_loss_before)} → {_fmt(metrics.eval_loss_after)} |",
        f"| seed | {meta.seed} |",
        f"| versions | {versions(meta)} |",
        "",
        *(
            [f"![Loss curve: train loss (raw and smoothed), eval loss and learning rate over steps]({curve})", ""]
            if curve
            else []
        ),
        "## Data",
        "",
        "| source | format | weight | share of training tokens |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{shown(s.path)}` | {s.format} | {s.weight} | {s.share or 0:.1%} |" for s in meta.data.sources]
    lines += [
        "",
        "## Use",
        "",
        "```bash",
        f'lorakit generate --adapter {name} "Your prompt"',
        "```",
        "",
        "With plain PEFT (the base model is fetched by the name in adapter_config.json):" if hub else
        "With plain PEFT (`BASE_MODEL_DIR`: the base model's folder on your machine):",
        "",
        "```python",
        "from peft import AutoPeftModelForCausalLM" if hub else "from peft import PeftModel",
        "from transformers import AutoTokenizer" if hub else "from transformers import AutoModelForCausalLM",
        *(
            [f'model = AutoPeftModelForCausalLM.from_pretrained("adapters/{name}")',
             f'tokenizer = AutoTokenizer.from_pretrained("{hub}")']
            if hub else
            ["base = AutoModelForCausalLM.from_pretrained(BASE_MODEL_DIR)",
             f'model = PeftModel.from_pretrained(base, "adapters/{name}")']
        ),
        "```",
        "",
    ]  # fmt: skip
    return "\n".join(lines)
