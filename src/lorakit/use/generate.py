"""Text generation with the base model or adapters from the store: one prompt, a mixed batch, a chat turn."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit.data.formats import alpaca_prompt
from lorakit.errors import LorakitError
from lorakit.store.loader import Loaded


def format_prompt(tokenizer, prompt: str, style: str) -> str:
    if style == "chat" and tokenizer.chat_template:
        msgs = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    if style == "alpaca":
        return alpaca_prompt(prompt)
    return prompt


def _gen_kwargs(loaded: Loaded, max_new_tokens: int, temperature: float, top_p: float) -> dict[str, Any]:
    """Sampling settings, and every stop token: the tokenizer's EOS and the generation config's."""
    tok = loaded.tokenizer
    eos = {tok.eos_token_id}
    gen_eos = loaded.model.generation_config.eos_token_id
    eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "eos_token_id": sorted(i for i in eos if i is not None),
        "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    }
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


def check_length(loaded: Loaded, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse before generating what the model cannot hold: an empty prompt, or more tokens than its context."""
    if prompt_tokens == 0:
        raise LorakitError("the prompt is empty after tokenizing; give the text to continue")
    config = loaded.model.config
    context = getattr(config.get_text_config(), "max_position_embeddings", None)
    if context and prompt_tokens + max_new_tokens > context:
        raise LorakitError(
            f"the prompt ({prompt_tokens} tokens) and --max-new-tokens {max_new_tokens} exceed this model's context "
            f"of {context} tokens; ask for at most {max(context - prompt_tokens, 0)} new tokens"
        )


def _style(loaded: Loaded, adapter: str | None, style: str | None) -> str:
    meta = loaded.metas.get(adapter, loaded.meta) if adapter else loaded.meta
    return style or (meta.tokenizer.prompt_style if meta else "raw")


def generate(
    loaded: Loaded,
    prompt: str,
    *,
    style: str | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 0,
    use_adapter: bool = True,
    adapter: str | None = None,
    streamer=None,
) -> str:
    """Generate a continuation with `adapter` (default: the first loaded); `use_adapter=False` runs
    the same model with its adapters disabled, i.e. the base model."""
    from contextlib import nullcontext

    tok = loaded.tokenizer
    adapter = adapter or loaded.adapter
    style = _style(loaded, adapter, style)
    text = format_prompt(tok, prompt, style)
    inputs = tok(text, return_tensors="pt", add_special_tokens=style != "chat")
    check_length(loaded, inputs["input_ids"].shape[1], max_new_tokens)
    inputs = {k: v.to(loaded.device) for k, v in inputs.items()}
    kwargs = {**_gen_kwargs(loaded, max_new_tokens, temperature, top_p), "streamer": streamer}
    torch.manual_seed(seed)
    if adapter and use_adapter:
        loaded.model.set_adapter(adapter)
    off = loaded.model.disable_adapter() if (loaded.adapter and not use_adapter) else nullcontext()
    with off, torch.no_grad():
        out = loaded.model.generate(**inputs, **kwargs)
    return tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


BASE = "base"  # how a prompts file names the base model


@dataclass
class BatchItem:
    prompt: str
    adapter: str | None  # None: the base model


def read_prompts(path: Path, default: str | None, known: list[str]) -> list[BatchItem]:
    """A prompts file: JSONL lines {"prompt": ..., "adapter": ...} or text lines, where a text line may
    start with `@NAME ` to pick its adapter (`@base` for the base model). Blank lines are skipped."""
    import json

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LorakitError(f"{path}: cannot read the prompts file ({getattr(e, 'strerror', None) or e})") from None
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LorakitError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise LorakitError(f'{path}:{n}: expected {{"prompt": "...", "adapter": "..."}}')
            name = row.get("adapter", default)
        elif line.startswith("@"):
            name, _, rest = line[1:].partition(" ")
            row = {"prompt": rest.strip()}
        else:
            name, row = default, {"prompt": line}
        name = None if name in (None, BASE) else str(name)
        if name is not None and name not in known:
            listed = ", ".join([*known, BASE]) or BASE
            raise LorakitError(f"{path}:{n}: adapter {name!r} is not loaded (loaded: {listed}; add --adapter {name})")
        if not row["prompt"]:
            raise LorakitError(f"{path}:{n}: empty prompt")
        items.append(BatchItem(row["prompt"], name))
    if not items:
        raise LorakitError(f"{path}: no prompts in the file")
    return items


def adapter_names(items: list[BatchItem]) -> list[str]:
    return ["__base__" if it.adapter is None else it.adapter for it in items]


def encode_batch(loaded: Loaded, items: list[BatchItem], style: str | None, pad: int):
    """Each item's prompt in its adapter's prompt style, left-padded into one batch: (input_ids, attention_mask)."""
    tok = loaded.tokenizer
    rows = []
    for it in items:
        st = _style(loaded, it.adapter, style)
        rows.append(tok(format_prompt(tok, it.prompt, st), add_special_tokens=st != "chat")["input_ids"])
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=loaded.device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=loaded.device)
    return ids, mask


def generate_batch(
    loaded: Loaded,
    items: list[BatchItem],
    *,
    style: str | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 0,
) -> list[str]:
    """Generate for every item in one batch, each row with its own adapter (peft's `adapter_names`)."""
    kwargs = _gen_kwargs(loaded, max_new_tokens, temperature, top_p)
    ids, mask = encode_batch(loaded, items, style, kwargs["pad_token_id"])
    width = ids.shape[1]
    check_length(loaded, width, max_new_tokens)
    if loaded.adapters:
        kwargs["adapter_names"] = adapter_names(items)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = loaded.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    return [loaded.tokenizer.decode(o[width:], skip_special_tokens=True) for o in out]


def chat_reply(
    loaded: Loaded,
    messages: list[dict[str, str]],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 0,
    streamer=None,
) -> str:
    """The assistant's next message, the conversation rendered with the adapter's chat template."""
    tok = loaded.tokenizer
    if not tok.chat_template:
        raise LorakitError("this model's tokenizer has no chat template; use `lorakit generate` instead")
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    check_length(loaded, ids["input_ids"].shape[1], max_new_tokens)
    ids = {k: v.to(loaded.device) for k, v in ids.items()}
    kwargs = {**_gen_kwargs(loaded, max_new_tokens, temperature, top_p), "streamer": streamer}
    torch.manual_seed(seed)
    with torch.no_grad():
        out = loaded.model.generate(**ids, **kwargs)
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
