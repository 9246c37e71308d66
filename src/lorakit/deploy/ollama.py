"""An Ollama Modelfile beside a GGUF file: the prompt template the model was trained with, in Ollama's template
language (raw text, an alpaca prompt, or the chat template), and its stop tokens."""

from __future__ import annotations

import json
import re
from pathlib import Path

from lorakit.data.formats import ALPACA_PROMPT

RAW_TEMPLATE = "{{ .Prompt }}"
ALPACA_TEMPLATE = ALPACA_PROMPT.replace("{instruction}", "{{ .Prompt }}")
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


def write_modelfile(
    gguf_path: Path, chat_template: str | None, stops: list[str], style: str = "chat"
) -> tuple[Path, str]:
    """An Ollama `Modelfile` next to the GGUF file: FROM, the TEMPLATE of `style` (how the model was trained to be
    prompted: raw, alpaca or chat), stop tokens. Returns its path and what template it holds."""
    gguf_path = Path(gguf_path)
    lines = [f"FROM ./{gguf_path.name}", ""]
    template = ollama_template(chat_template) if style == "chat" else None
    if style == "raw":
        lines.append(f'TEMPLATE """{RAW_TEMPLATE}"""')
        described = "raw text, no system prompt (the adapter was trained on plain text)"
        stops = stops[:1]  # EOS: the turn markers mean nothing to a model of plain text
    elif style == "alpaca":
        lines.append(f'TEMPLATE """{ALPACA_TEMPLATE}"""')
        described = "an alpaca instruction prompt, no system prompt (as the adapter was trained)"
        stops = stops[:1]
    elif template:
        described = "the chat template (ChatML)"
        lines.append(f'TEMPLATE """{template}"""')
        system = default_system(chat_template)
        if system:
            lines.append(f'SYSTEM """{system}"""')
            described += ", with its default system prompt"
    elif chat_template:
        lines.append("# The model's chat template is not ChatML-style and was not translated to Ollama's")
        lines.append("# template language: write a TEMPLATE line by hand (see the tokenizer's chat_template).")
        described = "none: the chat template is not ChatML-style; write a TEMPLATE line by hand"
    else:
        lines.append("# The model has no chat template: Ollama will send prompts as raw text.")
        described = "raw text (the model has no chat template)"
    lines.append("")
    for s in dict.fromkeys(s for s in stops if s):
        lines.append(f"PARAMETER stop {json.dumps(s)}")
    path = gguf_path.parent / "Modelfile"
    path.write_text("\n".join(lines) + "\n")
    return path, described


def stop_tokens(tokenizer) -> list[str]:
    """EOS and, for a ChatML template, the turn markers."""
    stops = [tokenizer.eos_token]
    if "<|im_end|>" in (tokenizer.chat_template or ""):
        stops += ["<|im_end|>", "<|im_start|>"]
    return [s for s in stops if s]
