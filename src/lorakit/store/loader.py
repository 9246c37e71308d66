"""The one loader: a base model and any number of adapters from the store, placed as the Plan says."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import LorakitError, short
from lorakit.internals import without_bitsandbytes
from lorakit.models.load import load_model
from lorakit.models.reference import ModelRef, parameter_count, resolve, weights_fingerprint
from lorakit.models.tokenizer import load_tokenizer
from lorakit.plan import Plan, plan_inference, probe
from lorakit.recipe import BaseModelSection
from lorakit.store import adapters
from lorakit.store.fit import check_fits
from lorakit.store.metadata import AdapterMeta


@dataclass
class Loaded:
    model: Any  # a PreTrainedModel or a PeftModel holding every loaded adapter
    tokenizer: Any
    meta: AdapterMeta | None  # the first adapter's lorakit.json
    adapter: str | None  # the first adapter
    adapters: list[str] = field(default_factory=list)
    metas: dict[str, AdapterMeta] = field(default_factory=dict)
    plan: Plan | None = None  # where and in what dtype the model runs

    @property
    def device(self) -> torch.device:
        """Where inputs go: the Plan's device (with device_map auto, where the first layers are)."""
        return torch.device(self.plan.device) if self.plan else next(self.model.parameters()).device


def check_base(meta: AdapterMeta, ref: ModelRef) -> None:
    """Refuse an adapter trained on different weights than the base about to be loaded."""
    want = meta.base_model.fingerprint
    have = weights_fingerprint(ref)
    if want and have and want != have:
        raise LorakitError(
            f"adapter {meta.name!r} was trained on base weights {want[:19]}..., but "
            f"{meta.base_model.reference} now has {have[:19]}...; the adapter would not apply correctly"
        )


def recorded_base(names: list[str], metas: dict[str, AdapterMeta], base: str | None) -> BaseModelSection:
    """The base model every adapter was trained on (they must agree), or `base` if given."""
    section = BaseModelSection()
    if names:
        recipe_base = metas[names[0]].recipe.base_model
        if recipe_base:
            section = recipe_base
        elif base is None:
            raise LorakitError(f"adapter {names[0]!r} does not record its base model; pass --base")
        refs = {n: metas[n].base_model.reference for n in names}
        if len(set(refs.values())) > 1:
            listed = ", ".join(f"{n}: {r}" for n, r in refs.items())
            raise LorakitError(f"these adapters were trained on different base models ({listed}); use one at a time")
    if base:
        section = section.model_copy(update={"name": base})
    return section


@contextmanager
def peft_errors(name: str) -> Iterator[None]:
    """What PEFT raises for an adapter_config.json it cannot build (a value of the wrong kind, an unknown option),
    as a message naming the adapter."""
    try:
        yield
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise LorakitError(f"adapter {name!r}: PEFT cannot load it ({type(e).__name__}: {short(e)})") from None


def remote_code(section: BaseModelSection, names: list[str], base: str | None, trust: bool) -> BaseModelSection:
    """`section` with code from the model's repository allowed only if this command asked (`trust`).

    An adapter's lorakit.json is a file anyone can copy into the store: what it records must never make lorakit
    import Python from a model folder. When it records a base that needs such code (and no --base replaces that
    base), loading is refused with a message saying how to allow it on purpose."""
    if section.trust_remote_code and not trust and base is None:
        raise LorakitError(
            f"adapter {names[0]!r} records that its base model {section.name} runs code from its repository; "
            "lorakit runs such code only when you ask for it: add --trust-remote-code if you trust that model"
        )
    return section.model_copy(update={"trust_remote_code": trust})


def inference_plan(verb: str, section: BaseModelSection, ref: ModelRef, dtype: str | None = None) -> Plan:
    """The Plan of an inference verb on this machine: the base's size decides one GPU or several."""
    n_params = parameter_count(ref) if probe_gpus() else 0
    return plan_inference(verb, section, probe(), n_params, dtype)


def probe_gpus() -> bool:
    import torch

    return torch.cuda.is_available()


def load(
    store: str | Path,
    adapter: str | list[str] | None,
    base: str | None = None,
    *,
    verb: str = "generate",
    dtype: str | None = None,
    full_precision: bool = False,
    names_as: list[str] | None = None,
    trust_remote_code: bool = False,
) -> Loaded:
    """Load the base model (the adapters', or `base`) once, placed as the verb's Plan says, and attach each adapter.

    `full_precision`: the base unquantized (merging and combining work on full-precision weights), in `dtype` if
    given; `names_as`: the names the adapters get inside the model (default: their store names);
    `trust_remote_code`: the user asked to run code from the base model's repository (never read from a file)."""
    names = [adapter] if isinstance(adapter, str) else list(adapter or [])
    metas = {n: adapters.load_meta(store, n) for n in names}
    section = remote_code(recorded_base(names, metas, base), names, base, trust_remote_code)
    if full_precision:
        section = section.model_copy(update={"quantization": "none", "dtype": dtype or section.dtype})
    quantized = section.quantization != "none"
    ref = resolve(section.name, section.revision)
    if not base:
        for n in names:
            check_base(metas[n], ref)
    tokenizer = load_tokenizer(ref, section.trust_remote_code)
    template = metas[names[0]].tokenizer.chat_template if names else None
    if template:
        tokenizer.chat_template = template
    plan = inference_plan(verb, section, ref, dtype)
    with without_bitsandbytes(quantized):
        from peft import PeftModel

        model = load_model(ref, plan, section.trust_remote_code)
        for n in names:  # each against the bare base, before any is attached (attaching renames its modules)
            check_fits(model, adapters.adapter_dir(store, n), n, section.name)
        for i, (n, as_name) in enumerate(zip(names, names_as or names, strict=True)):
            path = str(adapters.adapter_dir(store, n))
            with peft_errors(n):
                if i == 0:
                    model = PeftModel.from_pretrained(model, path, adapter_name=as_name)
                else:
                    model.load_adapter(path, adapter_name=as_name)
    model.eval()
    first = names[0] if names else None
    return Loaded(model, tokenizer, metas.get(first), first, names, metas, plan)
