"""Combining adapters of one base into a new adapter, with peft's `add_weighted_adapter`, and checked.

Every method is peft's own. After combining, lorakit compares the new adapter's weight update
ΔW = scale·B·A with the exact weighted sum Σ wᵢ·ΔWᵢ of the source adapters in every targeted layer
and reports the relative difference: `cat` must reproduce it exactly (it is refused otherwise),
`svd` approximates it at the chosen rank, and `linear`, `ties` and the `dare` methods combine the
A and B matrices separately, so their difference is a property of the method, shown, not refused.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import LorakitError
from lorakit.recipe import BaseModelSection
from lorakit.store import adapters, loader
from lorakit.store.metadata import AdapterMeta, Combined, CombinedSource, LoraRecord, RecipeRecord, now

# The methods offered: peft's combination types (the `_svd` ones re-factorize Σ wᵢ·ΔWᵢ at a chosen rank).
METHODS = (
    "linear",
    "cat",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # peft requires equal r for these
EXACT = ("cat",)  # methods whose result must equal Σ wᵢ·ΔWᵢ
EXACT_TOLERANCE = 1e-4  # relative Frobenius difference allowed for an exact method (float32 rounding)
SOURCE = "lorakit-src-{}"  # names the source adapters get inside the combining model


def needs_density(method: str) -> bool:
    return method.startswith(("ties", "dare", "magnitude_prune"))


@dataclass
class CombineReport:
    name: str
    method: str
    weights: dict[str, float]
    density: float | None
    r: int
    target_modules: list[str]
    relative_to_exact: float  # ‖ΔW_combined − Σ wᵢ·ΔWᵢ‖ / ‖Σ wᵢ·ΔWᵢ‖ over all targeted layers
    path: Path | None = None
    layers: int = 0
    notes: list[str] = field(default_factory=list)


def check_request(names: list[str], weights: list[float] | None, method: str, density: float | None) -> list[float]:
    """Validate the combination asked for; return the weights (equal weights summing to 1 by default)."""
    if len(names) < 2:
        raise LorakitError(
            "name at least two adapters to combine (to merge one adapter into its base: merge NAME --out)"
        )
    if len(set(names)) != len(names):
        raise LorakitError(f"an adapter is named twice: {' '.join(names)}")
    if method not in METHODS:
        raise LorakitError(f"--method must be one of {', '.join(METHODS)}; got {method!r}")
    if weights is None:
        weights = [1.0 / len(names)] * len(names)
    if len(weights) != len(names):
        raise LorakitError(f"{len(names)} adapters but {len(weights)} weights; give one weight per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise LorakitError("weights must be finite numbers")
    if not any(weights):
        raise LorakitError("all weights are 0: the combination would do nothing")
    if needs_density(method):
        if density is None:
            raise LorakitError(f"--method {method} needs --density (the fraction of values kept, e.g. 0.5)")
        if not 0 < density <= 1:
            raise LorakitError(f"--density must be in (0, 1], got {density}")
    elif density is not None:
        raise LorakitError(f"--density applies to ties, dare and magnitude_prune methods, not {method}")
    return [float(w) for w in weights]


def _peft_config(store: str | Path, name: str) -> dict[str, Any]:
    return json.loads((adapters.adapter_dir(store, name) / "adapter_config.json").read_text(encoding="utf-8"))


def _check_sources(store: str | Path, names: list[str], metas: dict[str, AdapterMeta], method: str) -> None:
    bases = {n: (m.base_model.reference, m.base_model.fingerprint) for n, m in metas.items()}
    refs = {r for r, _ in bases.values()}
    prints = {f for _, f in bases.values() if f}
    if len(refs) > 1 or len(prints) > 1:
        listed = ", ".join(f"{n}: {r}" for n, (r, _) in bases.items())
        raise LorakitError(f"only adapters of the same base model can be combined ({listed})")
    for n in names:
        config = _peft_config(store, n)
        if config.get("use_dora"):
            raise LorakitError(f"adapter {n!r} is a DoRA adapter; peft's weighted combination handles plain LoRA only")
        if config.get("use_rslora"):
            raise LorakitError(
                f"adapter {n!r} uses rsLoRA; peft's weighted combination assumes alpha/r scaling "
                "and would scale the result wrongly"
            )
    if method in SAME_RANK:
        ranks = {n: _peft_config(store, n).get("r") for n in names}
        if len(set(ranks.values())) > 1:
            listed = ", ".join(f"{n}: r={r}" for n, r in ranks.items())
            raise LorakitError(
                f"--method {method} needs adapters of the same rank ({listed}); use cat or svd, which accept any"
            )


def load_sources(store: str | Path, names: list[str], base: str | None = None, trust_remote_code: bool = False):
    """One full-precision base holding every source adapter (named SOURCE.format(i)), and their metas."""
    sources = [SOURCE.format(i) for i in range(len(names))]
    loaded = loader.load(
        store, names, base, verb="combine", dtype="float32", full_precision=True, names_as=sources,
        trust_remote_code=trust_remote_code,
    )  # fmt: skip
    section = loader.recorded_base(names, loaded.metas, base)
    return loaded.model, loaded.metas, section


def combine_adapters(
    store: str | Path,
    names: list[str],
    into: str,
    weights: list[float] | None = None,
    method: str = "cat",
    density: float | None = None,
    svd_rank: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    base: str | None = None,
    say=print,
    trust_remote_code: bool = False,
) -> CombineReport:
    """Combine adapters `names` of one base into a new adapter `into` in the store."""
    weights = check_request(names, weights, method, density)
    adapters.adapter_dir(store, into)  # a valid name, inside the store
    if adapters.exists(store, into) and not overwrite:
        raise LorakitError(f"adapter {into!r} already exists in {Path(store).resolve()}; use --overwrite to replace it")
    metas = {n: adapters.load_meta(store, n) for n in names}
    _check_sources(store, names, metas, method)
    model, metas, section = load_sources(store, names, base, trust_remote_code)
    sources = [SOURCE.format(i) for i in range(len(names))]
    torch.manual_seed(seed)  # the dare methods drop values at random
    try:
        model.add_weighted_adapter(
            sources, weights, "default", combination_type=method, density=density, svd_rank=svd_rank
        )
    except (ValueError, TypeError, RuntimeError) as e:
        raise LorakitError(f"peft could not combine these adapters with {method}: {e}") from None
    relative, layers = compare_with_exact(model, sources, weights)
    config = model.peft_config["default"]
    targets = sorted(config.target_modules) if isinstance(config.target_modules, set) else [config.target_modules]
    report = CombineReport(into, method, dict(zip(names, weights, strict=True)), density, config.r, targets, relative)
    report.layers = layers
    if method in EXACT and not relative <= EXACT_TOLERANCE:
        raise LorakitError(
            f"the {method} combination differs from the exact weighted sum by {relative:.2e} "
            f"(> {EXACT_TOLERANCE:.0e}); nothing written"
        )
    with warnings.catch_warnings():  # peft notes that the active adapter changes to the new one: intended
        warnings.simplefilter("ignore")
        for s in sources:
            model.delete_adapter(s)
    meta = combined_meta(into, names, metas, report, section.name, seed, model)
    report.path = adapters.save_adapter(model, store, into, meta, overwrite=overwrite)
    say(
        f"combined {', '.join(f'{n} ×{w:g}' for n, w in report.weights.items())} with {method}"
        + (f" (density {density:g})" if density is not None else "")
        + f" into {into!r}: r={report.r}, {len(targets)} target module types, {layers} layers"
    )
    say(f"  update vs the exact weighted sum Σ wᵢ·ΔWᵢ: relative difference {relative:.2e}{_explain(method)}")
    return report


def _explain(method: str) -> str:
    if method in EXACT:
        return " (exact method)"
    if method.endswith("svd"):
        return " (rank-truncated SVD of the combined update)"
    return " (this method combines A and B separately; it is not the weighted sum of the updates)"


def compare_with_exact(model, sources: list[str], weights: list[float]) -> tuple[float, int]:
    """Relative Frobenius difference between the combined adapter's ΔW and Σ wᵢ·ΔWᵢ, over all its layers."""
    from peft.tuners.lora import LoraLayer

    diff2 = ref2 = 0.0
    layers = 0
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
                continue
            exact = None
            for s, w in zip(sources, weights, strict=True):
                if s in module.lora_A:
                    d = w * module.get_delta_weight(s).float()
                    exact = d if exact is None else exact + d
            got = module.get_delta_weight("default").float()
            exact = torch.zeros_like(got) if exact is None else exact
            diff2 += float((got - exact).pow(2).sum())
            ref2 += float(exact.pow(2).sum())
            layers += 1
    return math.sqrt(diff2 / ref2) if ref2 > 0 else math.sqrt(diff2), layers


def combined_meta(name, names, metas, report: CombineReport, base_name: str, seed, model) -> AdapterMeta:
    first = metas[names[0]]
    trainable = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    recorded = first.recipe.base_model or BaseModelSection()
    return AdapterMeta(
        name=name,
        created=now(),
        method=f"LoRA ({report.method} of {len(names)})",
        combined=Combined(
            method=report.method,
            weights=report.weights,
            density=report.density,
            seed=seed,
            relative_to_exact=report.relative_to_exact,
            sources={
                n: CombinedSource(
                    created=metas[n].created,
                    recipe_hash=metas[n].recipe_hash,
                    method=metas[n].method,
                    target_modules=metas[n].target_modules,
                )
                for n in names
            },
        ),
        recipe=RecipeRecord(
            base_model=recorded.model_copy(update={"name": base_name}),
            lora=LoraRecord(r=report.r),
        ),
        base_model=first.base_model.model_copy(),
        tokenizer=first.tokenizer.model_copy(),
        target_modules=report.target_modules,
        lora_alpha=model.peft_config["default"].lora_alpha,
        trainable_params=trainable,
        versions=first.versions.model_copy(),
    )


def combine_and_merge(
    store: str | Path,
    names: list[str],
    out: Path,
    into: str | None = None,
    dtype: str = "float32",
    tolerance: float | None = None,
    overwrite: bool = False,
    base: str | None = None,
    say=print,
    **combine,
):
    """Combine, then merge the combination into a full model folder (verified like any merge).

    With `into`, the combined adapter is also kept in the store; otherwise it lives in a scratch store."""
    from lorakit.deploy.merge import check_out, merge_adapter

    check_out(Path(out), overwrite, keep=[Path(store)])
    if into:
        report = combine_adapters(store, names, into, overwrite=overwrite, base=base, say=say, **combine)
        trust = combine.get("trust_remote_code", False)
        return report, merge_adapter(store, into, out, dtype, tolerance, overwrite, base, say, trust)
    scratch = Path(tempfile.mkdtemp(prefix=".lorakit-combine-", dir=Path(out).expanduser().resolve().parent))
    try:
        for n in names:
            shutil.copytree(adapters.adapter_dir(store, n), scratch / n)
        report = combine_adapters(scratch, names, "combined", base=base, say=say, **combine)
        trust = combine.get("trust_remote_code", False)
        return report, merge_adapter(scratch, "combined", out, dtype, tolerance, overwrite, base, say, trust)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
