"""lorakit.json: what an adapter records about itself (recipe, plan, base model, data, metrics, versions).

The file is typed (`AdapterMeta`) and versioned (`format_version`). Files written before the format was
versioned read as format 0, which has the same shape with fewer fields recorded; a file of a newer format
than this lorakit reads is refused with a message saying so, rather than half understood."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lorakit.data.formats import prompt_style
from lorakit.errors import LorakitError
from lorakit.recipe import BaseModelSection, Recipe

META_FILE = "lorakit.json"
REQUIRED = ("adapter_config.json", "adapter_model.safetensors")
FORMAT_VERSION = 1  # 0: files from before the version was recorded (same shape, read as they are)


class Record(BaseModel):
    """A part of lorakit.json. Fields it does not declare are kept as they are, so rewriting a file
    (rename, copy) never drops what another lorakit of the same format recorded."""

    model_config = ConfigDict(extra="allow")


class BaseModelInfo(Record):
    reference: str | None = None  # as the recipe named it
    kind: str | None = None  # hub, dir, gguf, embedded
    path: str | None = None
    gguf_file: str | None = None
    architecture: str | None = None
    quantization: str | None = None  # how the base was loaded for training (unknown for imported adapters)
    fingerprint: str | None = None  # sha256 of the weights trained on; None: not recorded
    portable_id: str | None = None  # how other machines and tools name it (adapter_config.json's base model)
    converted_from: str | None = None  # the embedded model: the GGUF its weights were converted from, its sha256


class TokenizerInfo(Record):
    eos_token: str | None = None
    pad_token: str | None = None
    chat_template: str | dict[str, str] | None = None
    prompt_style: str = "raw"  # how generate formats a prompt by default


class SourceReport(Record):
    path: str
    format: str
    weight: float = 1.0
    documents: int | None = None
    examples: int | None = None
    train_tokens: int | None = None
    share: float | None = None  # of the training tokens
    held_out: list[int] | None = None  # record indices held out for evaluation (None: written before recorded)


class DataReport(Record):
    sources: list[SourceReport] = Field(default_factory=list)
    train_tokens: int | None = None
    train_examples: int | None = None
    eval_tokens: int | None = None
    eval_examples: int | None = None
    supervised_tokens: int | None = None
    content_hash: str | None = None


class PlanRecord(Record):
    """The resolved Plan the adapter was trained with (`lorakit.plan.Plan` as JSON). Adapters written before the
    Plan recorded only these four; the rest of a Plan's fields are kept as they were written."""

    device: str | None = None
    precision: str | None = None
    packing: bool | str | None = None  # a bool before the Plan: padding-free packing on or off
    gradient_checkpointing: bool | None = None
    learning_rate: float | None = None
    learning_rate_from: str | None = None  # "recipe", or how `auto` resolved it; None before it was recorded


class Metrics(Record):
    train_loss: float | None = None
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None
    eval_perplexity_after: float | None = None
    steps: int | None = None
    train_tokens_seen: int | None = None
    train_runtime_s: float | None = None
    tokens_per_second: float | None = None


class LoraRecord(Record):
    r: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    use_dora: bool = False
    use_rslora: bool = False


class RecipeRecord(Record):
    """The resolved recipe as trained. Imported and combined adapters record only some of it."""

    base_model: BaseModelSection | None = None
    lora: LoraRecord = Field(default_factory=LoraRecord)
    # Kept as written: it is validated where used, since its files may have moved or changed since.
    data: dict[str, Any] | None = None


class CombinedSource(Record):
    created: str | None = None
    recipe_hash: str | None = None
    method: str | None = None
    target_modules: list[str] | None = None


class Combined(Record):
    method: str
    weights: dict[str, float]
    density: float | None = None
    seed: int = 0
    relative_to_exact: float | None = None
    sources: dict[str, CombinedSource] = Field(default_factory=dict)


class Versions(Record):
    lorakit: str | None = None
    torch: str | None = None
    transformers: str | None = None
    peft: str | None = None
    trl: str | None = None
    datasets: str | None = None
    accelerate: str | None = None
    bitsandbytes: str | None = None


class AdapterMeta(Record):
    format_version: int = Field(FORMAT_VERSION, strict=True)  # strict: "2" must not read as format 2
    name: str
    created: str = ""
    method: str = "LoRA"
    imported: bool = False  # made elsewhere: nothing is known beyond its adapter_config.json
    imported_from: str | None = None
    copied_from: str | None = None
    recipe: RecipeRecord = Field(default_factory=RecipeRecord)
    base_model: BaseModelInfo = Field(default_factory=BaseModelInfo)
    tokenizer: TokenizerInfo = Field(default_factory=TokenizerInfo)
    target_modules: list[str] = Field(default_factory=list)
    lora_alpha: int | float | None = None
    trainable_params: int | None = None
    data: DataReport = Field(default_factory=DataReport)
    plan: PlanRecord = Field(default_factory=PlanRecord)
    metrics: Metrics = Field(default_factory=Metrics)
    seed: int | None = None
    recipe_hash: str | None = None
    versions: Versions = Field(default_factory=Versions)
    combined: Combined | None = None  # how a combined adapter was made from its sources

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"

    def learning_rate_text(self) -> str:
        """The peak learning rate the run used and where it came from (the recipe's, for adapters written before
        the Plan recorded it)."""
        lr = self.plan.learning_rate
        if lr is None:
            lr = ((self.recipe.model_extra or {}).get("train") or {}).get("learning_rate")
        if not isinstance(lr, (int, float)) or isinstance(lr, bool):
            return "not recorded"
        return f"{lr:.2g}" + (f" ({self.plan.learning_rate_from})" if self.plan.learning_rate_from else "")


class UnreadableMeta(LorakitError):
    """A lorakit.json this lorakit cannot use; `why` is the short reason `adapters list` shows."""

    def __init__(self, message: str, why: str):
        super().__init__(message)
        self.why = why


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def versions() -> Versions:
    import importlib.metadata as md

    out = {}
    for pkg in Versions.model_fields:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "missing"
    return Versions(**out)


def method_name(recipe: Recipe) -> str:
    kind = "DoRA" if recipe.lora.use_dora else "LoRA"
    return {"4bit": "QLoRA", "8bit": f"{kind} (8-bit base)"}.get(recipe.base_model.quantization, kind)


def build_meta(recipe, ref, config, tokenizer, trainable, data, plan, metrics) -> AdapterMeta:
    """lorakit.json: everything needed to use, reproduce and check this adapter."""
    from lorakit.models.embedded import converted_from
    from lorakit.models.reference import portable_id

    return AdapterMeta(
        name=recipe.adapter_name,
        created=now(),
        method=method_name(recipe),
        recipe=RecipeRecord.model_validate(recipe.model_dump(mode="json")),
        base_model=BaseModelInfo(
            reference=recipe.base_model.name,
            kind=ref.kind,
            path=ref.path,
            gguf_file=ref.gguf_file,
            architecture=(config.architectures or [config.model_type])[0],
            quantization=recipe.base_model.quantization,
            portable_id=portable_id(recipe.base_model.name, ref),
            converted_from=converted_from(ref.path) if ref.kind == "embedded" else None,
        ),
        tokenizer=TokenizerInfo(
            eos_token=tokenizer.eos_token,
            pad_token=tokenizer.pad_token,
            chat_template=tokenizer.chat_template,
            prompt_style=prompt_style(tokenizer, {s.format for s in recipe.data.sources}),
        ),
        target_modules=list(plan.target_modules),
        lora_alpha=plan.lora_alpha,
        trainable_params=trainable,
        data=DataReport.model_validate(data.report),
        plan=PlanRecord.model_validate(plan.model_dump(mode="json")),
        metrics=Metrics.model_validate(metrics),
        seed=recipe.train.seed,
        recipe_hash="sha256:"
        + hashlib.sha256(recipe.model_dump_json(exclude={"output": {"store", "runs_dir"}}).encode()).hexdigest(),
        versions=versions(),
    )


def peft_meta(name: str, config: dict[str, Any], imported_from: str | None = None, created: str = "") -> AdapterMeta:
    """What a PEFT adapter made elsewhere tells about itself in its adapter_config.json."""
    base = config.get("base_model_name_or_path")
    targets = config.get("target_modules") or []
    try:
        return AdapterMeta(
            name=name,
            created=created,
            imported=True,
            imported_from=imported_from,
            method="DoRA" if config.get("use_dora") else "LoRA",
            base_model=BaseModelInfo(reference=base),
            recipe=RecipeRecord(
                lora=LoraRecord(r=config.get("r")), base_model=BaseModelSection(name=base) if base else None
            ),
            target_modules=sorted(targets) if isinstance(targets, list) else [targets],
            lora_alpha=config.get("lora_alpha"),
        )
    except ValidationError as e:
        raise LorakitError(f"adapter {name!r}: {REQUIRED[0]} is unreadable: {_problem(e)}") from None


def read_meta(path: Path) -> AdapterMeta:
    """The lorakit.json of the adapter folder `path` (an imported adapter's, if it has none).

    Raises UnreadableMeta, naming the adapter and the field, for a file that is not valid JSON, holds a
    wrong type, or was written by a newer lorakit."""
    name, meta_file = path.name, path / META_FILE
    if not meta_file.is_file():
        return AdapterMeta(name=name, imported=True)
    try:
        raw = json.loads(meta_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        why = f"{e.msg} at line {e.lineno}"
        raise UnreadableMeta(f"adapter {name!r}: {meta_file} is unreadable ({why})", why) from None
    except RecursionError:
        raise UnreadableMeta(f"adapter {name!r}: {meta_file} nests JSON too deeply", "nested too deeply") from None
    except UnicodeDecodeError:
        raise UnreadableMeta(f"adapter {name!r}: {meta_file} is unreadable (not UTF-8 text)", "not UTF-8") from None
    if not isinstance(raw, dict):
        why = f"expected a JSON object, got {type(raw).__name__}"
        raise UnreadableMeta(f"adapter {name!r}: {meta_file} is unreadable ({why})", why)
    version = raw.get("format_version", 0)  # absent: written before the format was versioned
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise UnreadableMeta(
            f"adapter {name!r} was written by a newer lorakit (format {version}; this one reads "
            f"{FORMAT_VERSION}): upgrade lorakit",
            f"written by a newer lorakit (format {version})",
        )
    try:
        return AdapterMeta.model_validate(_upgrade(raw, version))
    except ValidationError as e:
        why = _problem(e)
        raise UnreadableMeta(f"adapter {name!r}: {meta_file} is unreadable: {why}", why) from None


def _upgrade(raw: dict[str, Any], version: Any) -> dict[str, Any]:
    """A file of an older format in the current one. Format 0 differs only in lacking the version."""
    if version == 0:
        return {**raw, "format_version": FORMAT_VERSION}
    return raw


def _problem(e: ValidationError) -> str:
    """The first problem pydantic found, as `field.path: what is wrong (got value)`."""
    errors = e.errors()
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"]) or "top level"
    got = first.get("input")
    shown = f" (got {got!r:.40})" if isinstance(got, str | int | float | bool) else ""
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{shown}{more}"


def check_consistent(path: Path, meta: AdapterMeta) -> None:
    """The PEFT config on disk must be the one lorakit recorded (rank and target modules)."""
    from lorakit.store.fit import read_peft_config

    config = read_peft_config(path)
    recorded_r = meta.recipe.lora.r
    if recorded_r is not None and config.get("r") != recorded_r:
        raise LorakitError(
            f"adapter {path.name!r}: adapter_config.json has r={config.get('r')} but lorakit.json recorded "
            f"r={recorded_r}; the files do not belong together"
        )
    recorded_t = meta.target_modules
    on_disk = config.get("target_modules")
    if (
        recorded_t
        and on_disk is not None
        and sorted(recorded_t) != sorted(on_disk if isinstance(on_disk, list) else [on_disk])
    ):
        raise LorakitError(
            f"adapter {path.name!r}: adapter_config.json has target_modules {on_disk} but lorakit.json recorded "
            f"{recorded_t}; the files do not belong together"
        )


def write_meta(path: Path, meta: AdapterMeta) -> None:
    tmp = path / f".{META_FILE}.tmp"
    tmp.write_text(meta.to_json())
    tmp.replace(path / META_FILE)
