"""The recipe: a typed, validated description of one fine-tuning run.

Loading a recipe never touches torch, a model or data: every problem in a recipe is
reported here, all at once, before anything expensive starts.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lorakit.errors import LorakitError

EMBEDDED_DEFAULT = "embedded:smollm2-135m-instruct"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class RecipeError(LorakitError):
    """A recipe (or an override) is invalid; `problems` lists (key path, message) pairs."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        n = len(self.problems)
        lines = [f"{self.source}: {n} problem{'s' if n != 1 else ''}"]
        lines += [f"  {loc}: {msg}" if loc else f"  {msg}" for loc, msg in self.problems]
        return "\n".join(lines)


def check_name(name: str) -> str:
    """Validate an adapter name: a single path component, safe on every filesystem."""
    if not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise ValueError(
            f"invalid adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no '/', no '..')"
        )
    return name


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class BaseModelSection(Section):
    name: str = Field(
        EMBEDDED_DEFAULT,
        description="Model reference: a hub id (`gpt2`, `meta-llama/Llama-3.2-1B`), a local model "
        "directory, a `.gguf` file, or `embedded:smollm2-135m-instruct` (ships with lorakit).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="dtype of the frozen base weights (of a quantized base: what it does not quantize, such as "
        "embeddings and norms). `auto`: bfloat16 on a GPU that supports it (else float16); on the CPU bfloat16 "
        "when training in bf16 (autocast rounds them to bf16 anyway) with a full-precision or 4-bit base, "
        "else float32.",
    )
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none", description="Load the base with bitsandbytes: `4bit` is QLoRA, `8bit` is LLM.int8()."
    )
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type (`nf4` is QLoRA's).")
    double_quant: bool = Field(True, description="Quantize the 4-bit quantization constants too.")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="dtype 4-bit layers compute in. `auto`: follows `train.precision`."
    )
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with the checkpoint. Only for models you trust."
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto",
        description="Attention kernel. `auto`: sdpa (keeps packed documents apart); when training packed on the "
        "CPU, sdpa run on each document on its own (same result, a fraction of the work).",
    )


class LoraSection(Section):
    r: int = Field(16, gt=0, le=4096, description="LoRA rank.")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha (scaling numerator). Default: 2 x r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input, in [0, 1).")
    target_modules: Literal["auto", "all-linear"] | list[str] = Field(
        "auto",
        description="Modules to adapt: `auto` (every linear layer of the blocks, named in the run "
        "log), `all-linear` (peft's rule), or a list of module names such as [q_proj, v_proj].",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha/sqrt(r).")
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full and saved with the adapter (e.g. [lm_head]).",
    )

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("must name at least one module, or be 'auto' / 'all-linear'")
        return v


class DataSource(Section):
    path: str = Field(
        description="A file (.txt .md .jsonl .json .csv .parquet), a folder of such files, or a "
        "saved `datasets` folder. Relative paths are relative to the recipe file."
    )
    format: Literal["text", "completion", "instruction", "chat"] = Field(
        "text",
        description="`text`: raw continuation; `completion`: prompt + completion (loss on the "
        "completion); `instruction`: alpaca fields (instruction, input, output); `chat`: a list "
        "of messages rendered with the tokenizer's chat template (loss on assistant turns).",
    )
    field: str | None = Field(
        None,
        description="Column holding the data in tabular files. Default: `text` for text, `messages` "
        "for chat, `prompt`/`completion` and `instruction`/`input`/`output` otherwise.",
    )
    split: Literal["file", "paragraph", "line"] = Field(
        "file",
        description="How .txt/.md files become documents: one per file, per blank-line-separated "
        "paragraph, or per line.",
    )
    weight: float = Field(
        1.0,
        gt=0,
        description="Relative share of this source in the training mix (1.0 = use it as is; 2.0 = twice; 0.5 = half).",
    )


class DataSection(Section):
    sources: list[DataSource] = Field(min_length=1, description="Where the training data comes from.")
    eval_split: float | str = Field(
        0.1,
        description="Held-out share of the documents for eval loss (0 turns eval off, at most 0.5), "
        "or a path to a separate eval file in the first source's format.",
    )
    block_size: int = Field(512, ge=8, le=131072, description="Tokens per packed training block.")
    packing: bool = Field(
        True,
        description="Pack documents into full blocks (EOS between them, attention kept apart). "
        "Off: one document per row, padded.",
    )
    cache: bool = Field(
        True,
        description="Keep the prepared (tokenized, split) data in lorakit's cache (`~/.cache/lorakit/data`, "
        "or under `$XDG_CACHE_HOME` / `$LORAKIT_CACHE`), keyed by the data files' content, this section, the "
        "tokenizer and the seed: a rerun loads it instead of tokenizing again. `false`: prepare afresh each run. "
        "`lorakit cache list` shows the entries, `lorakit cache clear [--older-than DAYS]` removes them.",
    )

    @field_validator("eval_split", mode="before")
    @classmethod
    def _number_strings(cls, v: Any) -> Any:
        # YAML reads `5e-2` (no dot) as a string: a number is a fraction, not a file name.
        if isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                return v
        return v

    @field_validator("eval_split")
    @classmethod
    def _eval_range(cls, v: Any) -> Any:
        if isinstance(v, float) and not 0 <= v <= 0.5:
            raise ValueError(f"a fraction must be in [0, 0.5], got {v}")
        return v


class TrainSection(Section):
    epochs: float = Field(1.0, gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="Peak learning rate.")
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps spent warming up.")
    batch_size: int = Field(4, gt=0, description="Blocks per device per step.")
    gradient_accumulation: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    gradient_checkpointing: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Recompute activations to save memory. `auto`: on for GPUs and for quantized bases "
        "(4-bit/8-bit are chosen for memory: QLoRA on the CPU measured 40-46% less peak memory for 11-25% fewer "
        "tokens/s), off for full-precision bases on the CPU (a third more compute; CPU RAM is rarely the limit).",
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="Mixed precision. `auto`: bf16 where supported (CPU and recent GPUs), else fp16 "
        "on a GPU, else fp32.",
    )
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "adamw_8bit", "sgd"] = Field(
        "adamw_torch", description="Optimizer (transformers' names)."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 disables).")
    seed: int = Field(42, ge=0, description="Seed for weights init, data order and dropout.")
    logging_every: int = Field(5, gt=0, description="Log loss and tokens/s every N steps.")
    eval_every: int | None = Field(None, gt=0, description="Evaluate every N steps (always before and after training).")
    save_every: int | None = Field(
        None, gt=0, description="Write a resumable checkpoint under runs/<name>/ every N steps."
    )
    keep_checkpoints: int = Field(2, gt=0, description="How many checkpoints to keep.")

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _yaml_on_off(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare `on`/`off` as a boolean.
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class OutputSection(Section):
    name: str | None = Field(None, description="Adapter name in the store. Default: the recipe file's name.")
    store: str = Field("adapters", description="Adapter store folder (relative to the working dir).")
    runs_dir: str = Field("runs", description="Folder for checkpoints and metrics of runs.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return None if v is None else check_name(v)


class Recipe(Section):
    base_model: BaseModelSection = Field(
        default_factory=BaseModelSection,
        description="The model to adapt (a bare string is shorthand for `base_model.name`).",
    )
    lora: LoraSection = Field(default_factory=LoraSection, description="The LoRA adapter.")
    data: DataSection = Field(description="Training (and eval) data.")
    train: TrainSection = Field(default_factory=TrainSection, description="Optimisation.")
    output: OutputSection = Field(default_factory=OutputSection, description="Where results go.")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("base_model"), str):
            data = {**data, "base_model": {"name": data["base_model"]}}
        return data

    @model_validator(mode="after")
    def _cross_field(self) -> Recipe:
        q = self.base_model.quantization
        if q != "none" and self.base_model.dtype == "float16" and self.train.precision == "bf16":
            raise ValueError("train.precision bf16 with base_model.dtype float16: pick one of them")
        if self.lora.use_dora and q == "8bit":
            raise ValueError("lora.use_dora is not supported with base_model.quantization 8bit")
        return self

    @property
    def adapter_name(self) -> str:
        assert self.output.name is not None, "load_recipe fills output.name"
        return self.output.name


def _did_you_mean(model: type[BaseModel], loc: tuple[Any, ...], key: str) -> str:
    """Find the model class at `loc` and suggest its closest field name to `key`."""
    cls: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            break
        ann = field.annotation
        cls = next(
            (a for a in (ann, *getattr(ann, "__args__", ())) if isinstance(a, type) and issubclass(a, BaseModel)),
            None,
        )
        if cls is None:
            return ""
    names = list(getattr(cls, "model_fields", {}))
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(names)})"


def _problems(err: ValidationError) -> list[tuple[str, str]]:
    out = []
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        if e["type"] == "extra_forbidden":
            path = ".".join(str(p) for p in loc)
            out.append((path, "unknown key" + _did_you_mean(Recipe, loc[:-1], str(loc[-1]))))
            continue
        # Pydantic adds the union member it tried ("list[str]", "literal[...]", "float") to the
        # location of a known field; drop those tags (the field names themselves are all known).
        clean = tuple(p for p in loc if not (isinstance(p, str) and _is_union_tag(p)))
        path = ".".join(str(p) for p in clean)
        if e["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            shown = repr(e.get("input"))
            # Our own validators (value_error) already name the value in their message.
            if "input" in e and not isinstance(e["input"], dict | list) and e["type"] != "value_error":
                msg += f", got {shown}"
        out.append((path, msg))
    # A union failure yields one message per member; keep the first per key path.
    seen: dict[str, str] = {}
    for path, msg in out:
        seen.setdefault(path, msg)
    return list(seen.items())


def _is_union_tag(part: str) -> bool:
    return "[" in part or part in {"str", "float", "int", "bool", "none", "function-after", "function-before"}


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `a.b.c=value`; the value is read as YAML (so numbers, booleans, lists work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or not all(key.split(".")):
        raise ValueError(f"--set {text!r}: expected KEY=VALUE, like train.learning_rate=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError, TypeError, RecursionError):
        value = raw  # not YAML we can build: take the text as it is
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> list[tuple[str, str]]:
    problems = []
    for text in overrides:
        try:
            keys, value = parse_override(text)
        except ValueError as e:
            problems.append(("", str(e)))
            continue
        node = raw
        for k in keys[:-1]:
            if isinstance(node.get(k), str) and k == "base_model":
                node[k] = {"name": node[k]}
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                problems.append((".".join(keys), "cannot set a key inside a non-mapping value"))
                break
        else:
            node[keys[-1]] = value
    return problems


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping safely; syntax errors become a RecipeError with line and column."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(str(path), [("", "file not found")]) from None
    except (UnicodeDecodeError, IsADirectoryError, PermissionError) as e:
        raise RecipeError(str(path), [("", f"cannot read: {e}")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise RecipeError(str(path), [("", f"YAML syntax error at {where}{e.problem or e}")]) from None
    except yaml.YAMLError as e:
        raise RecipeError(str(path), [("", f"YAML error: {e}")]) from None
    except (ValueError, TypeError) as e:  # a tagged or dated value PyYAML cannot build
        raise RecipeError(str(path), [("", f"YAML value error: {e}")]) from None
    except RecursionError:
        raise RecipeError(str(path), [("", "YAML nested too deeply")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(str(path), [("", f"a recipe is a mapping of sections, got {type(data).__name__}")])
    return data


def validate_recipe(raw: dict[str, Any], source: str, default_name: str | None = None) -> Recipe:
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(source, _problems(e)) from None
    if recipe.output.name is None:
        try:
            recipe.output.name = check_name(default_name or "adapter")
        except (ValueError, ValidationError):
            raise RecipeError(
                source, [("output.name", "the file name is not a valid adapter name; set output.name")]
            ) from None
    return recipe


def load_recipe(path: Path | str, overrides: list[str] | None = None) -> Recipe:
    """Load, override and validate a recipe file. Relative data paths resolve against its folder."""
    path = Path(path)
    raw = read_yaml(path)
    problems = apply_overrides(raw, overrides or [])
    if problems:
        raise RecipeError(str(path), problems)
    recipe = validate_recipe(raw, str(path), default_name=path.stem)
    problems = []
    for i, src in enumerate(recipe.data.sources):
        try:
            src.path = str(resolve_path(src.path, path.parent))
        except (ValueError, RuntimeError, OSError) as e:
            problems.append((f"data.sources.{i}.path", f"not a usable path: {e}"))
    if isinstance(recipe.data.eval_split, str):
        try:
            recipe.data.eval_split = str(resolve_path(recipe.data.eval_split, path.parent))
        except (ValueError, RuntimeError, OSError) as e:
            problems.append(("data.eval_split", f"not a usable path: {e}"))
    if problems:
        raise RecipeError(str(path), problems)
    return recipe


def resolve_path(p: str, base: Path) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else (base / q).resolve()


def recipe_json_schema() -> dict[str, Any]:
    schema = Recipe.model_json_schema()
    schema["title"] = "lorakit recipe"
    base = schema["properties"]["base_model"]
    ref = {k: base.pop(k) for k in ("$ref", "allOf") if k in base}
    base["anyOf"] = [{"type": "string", "description": "Shorthand for base_model.name."}, ref]
    return schema


def reference_markdown() -> str:
    """Every recipe key with its type, default and description, as a markdown table."""
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    sections = {
        "base_model": BaseModelSection,
        "lora": LoraSection,
        "data": DataSection,
        "data.sources[]": DataSource,
        "train": TrainSection,
        "output": OutputSection,
    }
    for prefix, cls in sections.items():
        for name, f in cls.model_fields.items():
            if name == "sources":
                continue
            default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
            cells = [f"`{prefix}.{name}`", _type_name(f.annotation), f"`{default}`", f.description or ""]
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"


def _type_name(ann: Any) -> str:
    """A short, readable type: `int`, `str or null`, `one of: none, 4bit, 8bit`, `list of str`."""
    args = getattr(ann, "__args__", ())
    origin = getattr(ann, "__origin__", None)
    if origin is Literal:
        return "one of: " + ", ".join(str(a) for a in args)
    if origin is list:
        return "list of " + _type_name(args[0])
    if args:  # a union
        return " or ".join(_type_name(a) for a in args)
    if ann is type(None):
        return "null"
    return getattr(ann, "__name__", str(ann))


REFERENCE_START = "<!-- recipe-reference:start -->"
REFERENCE_END = "<!-- recipe-reference:end -->"


def update_reference(readme: Path) -> bool:
    """Rewrite the generated recipe reference between the markers in `readme`; True if it changed."""
    text = readme.read_text()
    head, _, rest = text.partition(REFERENCE_START)
    _, _, tail = rest.partition(REFERENCE_END)
    new = f"{head}{REFERENCE_START}\n{reference_markdown()}{REFERENCE_END}{tail}"
    if new != text:
        readme.write_text(new)
    return new != text


if __name__ == "__main__":  # `make docs`
    import sys

    update_reference(Path(sys.argv[1] if len(sys.argv) > 1 else "README.md"))
