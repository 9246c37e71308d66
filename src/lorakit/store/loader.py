"""The one loader: a base model and any number of adapters from the store, placed as the Plan says."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import LorakitError
from lorakit.internals import without_bitsandbytes
from lorakit.models.load import load_model
from lorakit.models.reference import ModelRef, resolve, weights_fingerprint
from lorakit.models.tokenizer import load_tokenizer
from lorakit.recipe import BaseModelSection
from lorakit.store import adapters


@dataclass
class Loaded:
    model: Any  # a PreTrainedModel or a PeftModel holding every loaded adapter
    tokenizer: Any
    meta: dict[str, Any]  # the first adapter's lorakit.json
    adapter: str | None  # the first adapter
    adapters: list[str] = field(default_factory=list)
    metas: dict[str, dict[str, Any]] = field(default_factory=dict)


def check_base(meta: dict[str, Any], ref: ModelRef) -> None:
    """Refuse an adapter trained on different weights than the base about to be loaded."""
    want = meta.get("base_model", {}).get("fingerprint")
    have = weights_fingerprint(ref)
    if want and have and want != have:
        raise LorakitError(
            f"adapter {meta.get('name')!r} was trained on base weights {want[:19]}..., but "
            f"{meta['base_model']['reference']} now has {have[:19]}...; the adapter would not apply correctly"
        )


def recorded_base(names: list[str], metas: dict[str, dict], base: str | None) -> BaseModelSection:
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
    section = recorded_base(names, metas, base)
    quantized = section.quantization != "none"
    ref = resolve(section.name, section.revision)
    if not base:
        for n in names:
            check_base(metas[n], ref)
    tokenizer = load_tokenizer(ref, section.trust_remote_code)
    template = metas[names[0]].get("tokenizer", {}).get("chat_template") if names else None
    if template:
        tokenizer.chat_template = template
    compute = torch.bfloat16 if quantized else None
    with without_bitsandbytes(quantized):
        from peft import PeftModel

        model = load_model(ref, section, compute=compute)
        for i, n in enumerate(names):
            path = str(adapters.adapter_dir(store, n))
            if i == 0:
                model = PeftModel.from_pretrained(model, path, adapter_name=n)
            else:
                model.load_adapter(path, adapter_name=n)
    model.eval()
    first = names[0] if names else None
    return Loaded(model, tokenizer, metas.get(first, {}), first, names, metas)
