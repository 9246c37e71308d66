"""An Ollama Modelfile beside a GGUF file: the chat template in Ollama's template language, stop tokens."""

from __future__ import annotations

import json
import re
from pathlib import Path

CHATML_TEMPLATE = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""


def ollama_template(chat_template: str | None) -> str | None:
    """The chat template in Ollama's Go template language, for ChatML-style templates; else None."""
    if chat_template and "<|im_start|>" in chat_template and "<|im_end|>" in chat_template:
        return CHATML_TEMPLATE
    return None


def default_system(chat_template: str | None) -> str | None:
    """The system prompt a template writes when the conversation has none (SmolLM2's does)."""
    m = re.search(r"<\|im_start\|>system(?:\\n|\n)([^'\"<{}]+)<\|im_end\|>", chat_template or "")
    return m.group(1) if m else None


def write_modelfile(gguf_path: Path, chat_template: str | None, stops: list[str]) -> Path:
    """An Ollama `Modelfile` next to the GGUF file: FROM, TEMPLATE (if translatable), stop tokens."""
    gguf_path = Path(gguf_path)
    lines = [f"FROM ./{gguf_path.name}", ""]
    template = ollama_template(chat_template)
    if template:
        lines.append(f'TEMPLATE """{template}"""')
        system = default_system(chat_template)
        if system:
            lines.append(f'SYSTEM """{system}"""')
    elif chat_template:
        lines.append("# The model's chat template is not ChatML-style and was not translated to Ollama's")
        lines.append("# template language: write a TEMPLATE line by hand (see the tokenizer's chat_template).")
    else:
        lines.append("# The model has no chat template: Ollama will send prompts as raw text.")
    lines.append("")
    for s in dict.fromkeys(s for s in stops if s):
        lines.append(f"PARAMETER stop {json.dumps(s)}")
    path = gguf_path.parent / "Modelfile"
    path.write_text("\n".join(lines) + "\n")
    return path


def stop_tokens(tokenizer) -> list[str]:
    """EOS and, for a ChatML template, the turn markers."""
    stops = [tokenizer.eos_token]
    if "<|im_end|>" in (tokenizer.chat_template or ""):
        stops += ["<|im_end|>", "<|im_start|>"]
    return [s for s in stops if s]
