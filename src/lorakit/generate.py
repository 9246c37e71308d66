"""Text generation with the base model or an adapter from the store, streamed token by token."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit import adapters, models
from lorakit.data import alpaca_prompt
from lorakit.errors import LorakitError
from lorakit.recipe import BaseModelSection


@dataclass
class Loaded:
    model: Any  # a PreTrainedModel or a PeftModel holding every loaded adapter
    tokenizer: Any
    meta: dict[str, Any]  # the first adapter's lorakit.json
    adapter: str | None  # the first adapter
    adapters: list[str] = field(default_factory=list)
    metas: dict[str, dict[str, Any]] = field(default_factory=dict)


def check_base(meta: dict[str, Any], ref: models.ModelRef) -> None:
    """Refuse an adapter trained on different weights than the base about to be loaded."""
    want = meta.get("base_model", {}).get("fingerprint")
    have = models.weights_fingerprint(ref)
    if want and have and want != have:
        raise LorakitError(
            f"adapter {meta.get('name')!r} was trained on base weights {want[:19]}..., but "
            f"{meta['base_model']['reference']} now has {have[:19]}...; the adapter would not apply correctly"
        )


def _base_section(names: list[str], metas: dict[str, dict], base: str | None) -> BaseModelSection:
    """The base model every adapter was trained on (they must agree), or `base` if given."""
    section = BaseModelSection()
    if names:
        recipe_base = metas[names[0]].get("recipe", {}).get("base_model")
        if recipe_base:
            section = BaseModelSection.model_validate(recipe_base)
        elif base is None:
            raise LorakitError(f"adapter {names[0]!r} does not record its base model; pass --base")
        refs = {n: metas[n].get("base_model", {}).get("reference") for n in names}
        if len(set(refs.values())) > 1:
            listed = ", ".join(f"{n}: {r}" for n, r in refs.items())
            raise LorakitError(f"these adapters were trained on different base models ({listed}); use one at a time")
    if base:
        section = section.model_copy(update={"name": base})
    return section


def load(store: str | Path, adapter: str | list[str] | None, base: str | None = None) -> Loaded:
    """Load the base model (the adapters', or `base`) once and attach each adapter by name."""
    from peft import PeftModel

    names = [adapter] if isinstance(adapter, str) else list(adapter or [])
    metas = {n: adapters.load_meta(store, n) for n in names}
    section = _base_section(names, metas, base)
    ref = models.resolve(section.name, section.revision)
    if not base:
        for n in names:
            check_base(metas[n], ref)
    tokenizer = models.load_tokenizer(ref, section.trust_remote_code)
    template = metas[names[0]].get("tokenizer", {}).get("chat_template") if names else None
    if template:
        tokenizer.chat_template = template
    compute = torch.bfloat16 if section.quantization != "none" else None
    model = models.load_model(ref, section, compute=compute)
    for i, n in enumerate(names):
        path = str(adapters.adapter_dir(store, n))
        if i == 0:
            model = PeftModel.from_pretrained(model, path, adapter_name=n)
        else:
            model.load_adapter(path, adapter_name=n)
    model.eval()
    first = names[0] if names else None
    return Loaded(model, tokenizer, metas.get(first, {}), first, names, metas)


def format_prompt(tokenizer, prompt: str, style: str) -> str:
    if style == "chat" and tokenizer.chat_template:
        msgs = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    if style == "alpaca":
        return alpaca_prompt(prompt)
    return prompt


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
    meta = loaded.metas.get(adapter, loaded.meta) if adapter else loaded.meta
    style = style or meta.get("tokenizer", {}).get("prompt_style", "raw")
    text = format_prompt(tok, prompt, style)
    inputs = tok(text, return_tensors="pt", add_special_tokens=style != "chat")
    dev = next(loaded.model.parameters()).device
    inputs = {k: v.to(dev) for k, v in inputs.items()}
    eos = {tok.eos_token_id}
    gen_eos = loaded.model.generation_config.eos_token_id
    eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "eos_token_id": sorted(eos),
        "pad_token_id": tok.pad_token_id,
        "streamer": streamer,
    }
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    torch.manual_seed(seed)
    if adapter and use_adapter:
        loaded.model.set_adapter(adapter)
    off = loaded.model.disable_adapter() if (loaded.adapter and not use_adapter) else nullcontext()
    with off, torch.no_grad():
        out = loaded.model.generate(**inputs, **kwargs)
    return tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
