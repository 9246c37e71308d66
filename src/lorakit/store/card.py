"""The model card (README.md) written into every adapter folder."""

from __future__ import annotations

from typing import Any


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def model_card(name: str, meta: dict[str, Any]) -> str:
    recipe = meta.get("recipe", {})
    lora = recipe.get("lora", {})
    base = meta.get("base_model", {})
    metrics = meta.get("metrics", {})
    mix = meta.get("data", {}).get("sources", [])
    lines = [
        f"# {name}",
        "",
        f"A {meta.get('method', 'LoRA')} adapter for `{base.get('reference')}`, trained with lorakit "
        f"{meta.get('versions', {}).get('lorakit', '')}.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base.get('reference')}` ({base.get('architecture')}) |",
        f"| base weights | `{base.get('fingerprint')}` |",
        f"| rank / alpha | {lora.get('r')} / {meta.get('lora_alpha')} |",
        f"| target modules | {', '.join(meta.get('target_modules', []))} |",
        f"| trainable parameters | {_fmt(meta.get('trainable_params', '?'))} |",
        f"| steps / tokens | {metrics.get('steps')} / {metrics.get('train_tokens_seen')} |",
        f"| eval loss before → after | {_fmt(metrics.get('eval_loss_before'))} → "
        f"{_fmt(metrics.get('eval_loss_after'))} |",
        f"| seed | {meta.get('seed')} |",
        "",
        "## Data",
        "",
        "| source | format | weight | share of training tokens |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{s['path']}` | {s['format']} | {s['weight']} | {s.get('share', 0):.1%} |" for s in mix]
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
