"""Merging an adapter into its base model: a plain transformers model folder, checked before it is kept.

The adapter is merged into full-precision weights, never into 4-bit or 8-bit ones. A QLoRA adapter has two such
bases, the dequantized 4-bit weights it was trained on and the original ones: both merges are measured against the
model that was trained and the closer one is kept (`deploy/qlora.py`). The merged model's logits are compared with
base+adapter on a few samples, first in memory and again after reloading the written folder with plain
transformers; the folder is renamed into place only if both comparisons pass."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lorakit.deploy import qlora
from lorakit.deploy.verify import compare, perplexity, verification_samples
from lorakit.errors import LorakitError
from lorakit.fs import staged_dir
from lorakit.models.load import load_model, torch_dtype
from lorakit.models.reference import ModelRef, describe, local_files, resolve, weights_fingerprint
from lorakit.models.tokenizer import load_tokenizer
from lorakit.plan import Plan
from lorakit.recipe import BaseModelSection
from lorakit.store import adapters, loader
from lorakit.store.fit import check_fits
from lorakit.store.metadata import AdapterMeta

MERGE_FILE = "lorakit-merge.json"
# Largest |merged - base+adapter| logit difference allowed, relative to the largest |logit| (at least 1).
# float32: the same function computed in another order; measured 2e-6 on SmolLM2-135M, 4e-7 on the tiny
# test models. bfloat16 / float16: the merged weight W + BA is rounded once more, to 8 / 11 significant
# bits; measured 3.9e-2 / 5.2e-3 on SmolLM2-135M (its perplexity moved by 0.04% / 0.05%).
DEFAULT_TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-1, "float16": 2e-2}


@dataclass
class MergeReport:
    adapter: str
    out: Path
    base_model: str
    base_fingerprint: str | None
    dtype: str
    route: str
    samples: str = ""
    tolerance: float = 0.0
    logit_scale: float = 0.0  # largest |logit| of base+adapter on the samples
    adapter_effect: float = 0.0  # largest |base+adapter - base| logit difference: what the adapter changes
    max_abs_diff: float = 0.0  # largest |merged - base+adapter| logit difference, in memory or reloaded
    relative_diff: float = 0.0  # max_abs_diff / max(logit_scale, 1): what the tolerance applies to
    perplexity_adapter: float = math.nan  # base+adapter on the samples
    perplexity_merged: float = math.nan  # the written model, reloaded, on the same samples
    prompt_style: str | None = None  # how the adapter was trained to be prompted (raw, alpaca, chat): for exports
    qlora: dict[str, Any] | None = None  # a QLoRA adapter: both merges measured against the model trained
    seconds: float = 0.0
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "out": str(self.out)}


def merge_adapter(
    store: str | Path,
    name: str,
    out: Path,
    dtype: str = "float32",
    tolerance: float | None = None,
    overwrite: bool = False,
    base: str | None = None,
    say=print,
    trust_remote_code: bool = False,
    qlora_merge: str = "auto",
) -> MergeReport:
    """Merge adapter `name` into its base and write a full model to `out`; `base` overrides the recorded base.

    `qlora_merge` (an adapter trained on a 4-bit base): auto (the merge closer to the trained model), dequantized
    or original."""
    from peft import PeftModel

    started = time.perf_counter()
    if dtype not in DEFAULT_TOLERANCE:
        raise LorakitError(f"dtype must be one of {', '.join(DEFAULT_TOLERANCE)}, got {dtype!r}")
    if qlora_merge not in qlora.CHOICES:
        raise LorakitError(f"--qlora-merge must be one of {', '.join(qlora.CHOICES)}, got {qlora_merge!r}")
    tol = DEFAULT_TOLERANCE[dtype] if tolerance is None else tolerance
    meta = adapters.load_meta(store, name)
    adapter_path = adapters.adapter_dir(store, name)
    section = loader.remote_code(base_section(meta, adapter_path, dtype, base), [name], base, trust_remote_code)
    ref = resolve(section.name, section.revision)
    out = check_out(Path(out), overwrite, keep=[adapter_path.parent, *_base_files(ref)])
    _check_base(meta, ref, section.name)
    report = MergeReport(name, out, section.name, weights_fingerprint(ref), dtype, describe_route(meta, dtype))
    report.prompt_style = meta.tokenizer.prompt_style if not meta.imported else None
    say(f"base model: {section.name} ({describe(ref)})")
    say(report.route)
    tokenizer = load_tokenizer(ref, section.trust_remote_code)
    tokenizer.chat_template = meta.tokenizer.chat_template or tokenizer.chat_template
    samples, report.samples = verification_samples(meta, tokenizer)
    say(f"verifying on {report.samples}")

    plan = loader.inference_plan("merge", section, ref, dtype)
    say(plan.summary()[0])

    def original():
        model = load_model(ref, plan, section.trust_remote_code)
        check_fits(model, adapter_path, name, section.name)
        with loader.peft_errors(name):
            return PeftModel.from_pretrained(model, str(adapter_path)).eval()

    if trained_on_4bit(meta):

        def trained():  # the model the adapter was trained on and is served with: its 4-bit base + the adapter
            return loader.load(store, name, base, verb="merge", trust_remote_code=trust_remote_code).model

        merged, reference, report.adapter_effect, measured = qlora.best_merge(
            trained, adapter_path, samples, original, torch_dtype(dtype), qlora_merge, say
        )
        report.qlora = measured.to_json()
        report.route = f"merged into the {measured.chosen} base ({dtype}): {measured.why}"
        say(report.route)
    else:  # the logits of base+adapter are the only ones held for more than one sample at a time
        reference, report.adapter_effect, merged = qlora.premerge(original(), samples)
    report.logit_scale = max(float(r.abs().max()) for r in reference)
    report.tolerance = tol
    _verify(report, compare(merged, samples, reference)[0], "merged model")
    try:
        with staged_dir(out) as tmp:  # in place only once written, reloaded and checked
            save_merged(merged, tokenizer, tmp)
            del merged  # free the in-memory model before loading the written one
            diff, report.perplexity_merged = compare(_load_plain(tmp, plan), samples, reference)
            _verify(report, diff, "written model (reloaded with transformers)")
            report.perplexity_adapter = perplexity(reference, samples)
            report.seconds = round(time.perf_counter() - started, 2)
            (tmp / MERGE_FILE).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    except OSError as e:
        raise LorakitError(
            f"could not write the merged model next to {out}: {e.strerror or e}; nothing written"
        ) from None
    say(f"logits: merged - (base+adapter) at most {report.max_abs_diff:.2e} (relative {report.relative_diff:.2e})")
    say(f"  tolerance {tol:.0e}; the adapter itself moves logits by up to {report.adapter_effect:.2e}")
    say(f"perplexity: base+adapter {report.perplexity_adapter:.4f}, merged {report.perplexity_merged:.4f}")
    return report


def base_section(meta: AdapterMeta, adapter_path: Path, dtype: str, base: str | None) -> BaseModelSection:
    """The recipe's base model, loaded unquantized in `dtype` (or the `base` override)."""
    recorded = meta.recipe.base_model
    if recorded is None and base is None:
        hint = _peft_base(adapter_path)
        raise LorakitError(f"adapter {adapter_path.name!r} does not record its base model; pass --base{hint}")
    section = recorded or BaseModelSection()
    update: dict[str, Any] = {"quantization": "none", "dtype": dtype}
    if base is not None:
        update["name"] = base
    return section.model_copy(update=update)


def _peft_base(path: Path) -> str:
    try:
        named = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError):
        return ""
    return f" (its adapter_config.json names {named!r})" if named else ""


def _check_base(meta: AdapterMeta, ref: ModelRef, reference: str) -> None:
    shown = meta.model_copy(update={"base_model": meta.base_model.model_copy(update={"reference": reference})})
    try:
        loader.check_base(shown, ref)
    except LorakitError as e:
        raise LorakitError(f"{e}; nothing merged (pass --base with the weights it was trained on)") from None


def trained_on_4bit(meta: AdapterMeta) -> bool:
    recipe_base = meta.recipe.base_model or BaseModelSection()
    return (meta.base_model.quantization or recipe_base.quantization) == "4bit"


def describe_route(meta: AdapterMeta, dtype: str) -> str:
    recipe_base = meta.recipe.base_model or BaseModelSection()
    quant = meta.base_model.quantization or recipe_base.quantization
    route = f"merged into a {dtype} copy of the base"
    if quant == "4bit":
        kind = recipe_base.quant_type.upper()
        route = (
            f"the adapter was trained on a 4-bit {kind} base: merged into full-precision weights both ways "
            "(the dequantized 4-bit ones, the original ones), each measured against the model trained"
        )
    elif quant == "8bit":
        route += "; the adapter was trained on an 8-bit (LLM.int8) base (never merged into 8-bit weights)"
    return route


def _base_files(ref: ModelRef) -> list[Path]:
    """Where the base model's files are on disk (a hub model: its local cache, if any)."""
    if ref.gguf_file:
        return [Path(ref.path) / ref.gguf_file]
    root = local_files(ref)
    return [root] if root is not None else []


def check_out(out: Path, overwrite: bool, keep: list[Path]) -> Path:
    """Refuse an output that exists (unless `overwrite`) or would replace the store or the base model."""
    out = out.expanduser().resolve()
    for k in keep:
        k = k.resolve()
        if out == k or out in k.parents or k in out.parents:
            raise LorakitError(f"--out {out} overlaps {k}, which the merge reads; choose another folder")
    if out.exists() and not out.is_dir():
        raise LorakitError(f"--out {out} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LorakitError(f"--out {out} exists and is not empty; use --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _verify(report: MergeReport, diff: float, what: str) -> None:
    """Record the larger difference so far; refuse one over the tolerance (NaN included)."""
    scale = report.logit_scale
    report.max_abs_diff = max(report.max_abs_diff, diff) if diff == diff else diff
    report.relative_diff = report.max_abs_diff / max(scale, 1.0)
    if not report.relative_diff <= report.tolerance:
        raise LorakitError(
            f"{what} differs from base+adapter by {report.relative_diff:.2e} > tolerance {report.tolerance:.0e} "
            f"(max |logit difference| {report.max_abs_diff:.2e}, relative to the largest |logit|, {scale:.2f}; "
            f"the adapter itself moves logits by up to {report.adapter_effect:.2e}); nothing written"
        )


def save_merged(model, tokenizer, path: Path) -> None:
    """Safetensors weights, tokenizer files and a generation config whose EOS includes the tokenizer's and whose
    pad token is the tokenizer's."""
    gen = model.generation_config
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    ids = [i for i in eos if i is not None]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    gen.eos_token_id = ids[0] if len(ids) == 1 else (ids or None)
    if tokenizer.pad_token_id is not None:  # the tokenizer saved beside it pads with this token: one pad for all
        gen.pad_token_id = tokenizer.pad_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))


def _load_plain(path: Path, plan: Plan):
    """The written folder as a user loads it: plain transformers, no peft, the saved dtype, where the Plan says."""
    return load_model(resolve(str(path)), plan).eval()
