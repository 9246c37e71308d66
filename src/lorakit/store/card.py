"""The model card (README.md) written into every adapter folder."""

from __future__ import annotations

from typing import Any

from lorakit.store.metadata import AdapterMeta


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def model_card(name: str, meta: AdapterMeta) -> str:
    lora, base, metrics = meta.recipe.lora, meta.base_model, meta.metrics
    lines = [
        f"# {name}",
        "",
        f"A {meta.method} adapter for `{base.reference}`, trained with lorakit {meta.versions.lorakit or ''}.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base.reference}` ({base.architecture}) |",
        f"| base weights | `{base.fingerprint}` |",
        f"| rank / alpha | {lora.r} / {meta.lora_alpha} |",
        f"| learning rate | {meta.learning_rate_text()} |",
        f"| target modules | {', '.join(meta.target_modules)} |",
        f"| trainable parameters | {_fmt('?' if meta.trainable_params is None else meta.trainable_params)} |",
        f"| steps / tokens | {metrics.steps} / {metrics.train_tokens_seen} |",
        f"| eval loss before → after | {_fmt(metrics.eval_loss_before)} → {_fmt(metrics.eval_loss_after)} |",
        f"| seed | {meta.seed} |",
        "",
        "## Data",
        "",
        "| source | format | weight | share of training tokens |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{s.path}` | {s.format} | {s.weight} | {s.share or 0:.1%} |" for s in meta.data.sources]
    lines += [
        "",
        "## Use",
        "",
        "```bash",
        f'lorakit generate --adapter {name} "Your prompt"',
        "```",
        "",
        "With plain PEFT:",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "base = AutoModelForCausalLM.from_pretrained(BASE_MODEL_DIR)",
        f'model = PeftModel.from_pretrained(base, "adapters/{name}")',
        "```",
        "",
    ]
    return "\n".join(lines)
