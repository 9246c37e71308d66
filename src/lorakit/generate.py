"""Text generation with the base model or an adapter from the store, streamed token by token."""

from __future__ import annotations

import contextlib
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
    names = [adapter] if isinstance(adapter, str) else list(adapter or [])
    metas = {n: adapters.load_meta(store, n) for n in names}
    section = _base_section(names, metas, base)
    quantized = section.quantization != "none"
    ref = models.resolve(section.name, section.revision)
    if not base:
        for n in names:
            check_base(metas[n], ref)
    tokenizer = models.load_tokenizer(ref, section.trust_remote_code)
    template = metas[names[0]].get("tokenizer", {}).get("chat_template") if names else None
    if template:
        tokenizer.chat_template = template
    compute = torch.bfloat16 if quantized else None
    with without_bitsandbytes(quantized):
        from peft import PeftModel

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


@contextlib.contextmanager
def without_bitsandbytes(quantized: bool):
    """Import and use peft for a full-precision base without importing bitsandbytes.

    peft imports bitsandbytes whenever it is installed (at import, and again when it wraps layers),
    and bitsandbytes imports torch's compiler: about 1 s of a generation's start-up, for nothing when
    the base is not quantized. When the base is not quantized and bitsandbytes is not imported yet in
    this process, it is hidden for the duration (an import of it fails, find_spec says it is absent;
    peft then registers no 4/8-bit layers), and peft's cached answers are forgotten afterwards, so a
    quantized model loaded later in the same process still gets them."""
    import sys

    if quantized or "bitsandbytes" in sys.modules:
        yield
        return
    sys.modules["bitsandbytes"] = None
    _forget_bnb_answers()
    try:
        yield
    finally:
        del sys.modules["bitsandbytes"]
        _forget_bnb_answers()


def _forget_bnb_answers() -> None:
    import sys

    utils = sys.modules.get("peft.import_utils")
    if utils is not None:
        for name in ("is_bnb_available", "is_bnb_4bit_available"):
            getattr(utils, name).cache_clear()


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


def _style(loaded: Loaded, adapter: str | None, style: str | None) -> str:
    meta = loaded.metas.get(adapter, loaded.meta) if adapter else loaded.meta
    return style or meta.get("tokenizer", {}).get("prompt_style", "raw")


def _device(loaded: Loaded) -> torch.device:
    return next(loaded.model.parameters()).device


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
    inputs = {k: v.to(_device(loaded)) for k, v in inputs.items()}
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
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=_device(loaded))
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=_device(loaded))
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
    ids = {k: v.to(_device(loaded)) for k, v in ids.items()}
    kwargs = {**_gen_kwargs(loaded, max_new_tokens, temperature, top_p), "streamer": streamer}
    torch.manual_seed(seed)
    with torch.no_grad():
        out = loaded.model.generate(**ids, **kwargs)
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
