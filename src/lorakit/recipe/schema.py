"""The recipe's schema: every section and key, typed, with its default and description."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

EMBEDDED_DEFAULT = "embedded:smollm2-135m-instruct"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_name(name: str) -> str:
    """Validate an adapter name: a single path component, safe on every filesystem."""
    if not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise ValueError(
            f"invalid adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no '/', no '..')"
        )
    return name


class YamlFloat(float):
    """A number as a recipe file wrote it (`1e5`): a float for number keys, its text for text keys (a name)."""

    text: str


class Section(BaseModel):
    """Strict types: a value is taken as the type it is written in (no "16" for 16, no 0.5 for true), so that the
    recipe's JSON Schema (`lorakit recipe schema`) and this validator give every recipe the same verdict. A whole
    float (16.0) is an integer, as JSON Schema counts it."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _whole_floats(cls, data: Any) -> Any:
        if isinstance(data, dict):
            ints = {n for n, f in cls.model_fields.items() if f.annotation in (int, int | None)}
            texts = {n for n, f in cls.model_fields.items() if f.annotation in (str, str | None)}
            data = {
                k: int(v) if k in ints and isinstance(v, float) and v.is_integer()
                else v.text if k in texts and isinstance(v, YamlFloat)
                else v
                for k, v in data.items()
            }  # fmt: skip
        return data


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
    alpha: float | None = Field(
        None,
        gt=0,
        description="LoRA alpha: the update is scaled by alpha / r. Default: 32 whatever `r` is, so changing the rank "
        "does not move the best learning rate.",
    )
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Dropout on the LoRA input, in [0, 1). Default 0: measured against 0.05 on the embedded model "
        "(bench/results/quality.md), the same held-out loss with 23% less peak memory and 28% less training time "
        "(dropout copies every adapted layer's input).",
    )
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
        le=1000,
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

    @field_validator("eval_split")
    @classmethod
    def _eval_range(cls, v: Any) -> Any:
        if isinstance(v, float) and not 0 <= v <= 0.5:
            raise ValueError(f"a fraction must be in [0, 0.5], got {v}")
        return v


# transformers' reporting integrations (`report_to`), by name
Tracker = Literal[
    "tensorboard", "wandb", "mlflow", "trackio", "comet_ml", "neptune", "clearml", "dvclive", "swanlab",
    "codecarbon", "dagshub", "azure_ml", "flyte", "kubeflow",
]  # fmt: skip


class TrainSection(Section):
    epochs: float = Field(1.0, gt=0, le=1000, description="Passes over the training data (at most 1000).")
    max_steps: int | None = Field(
        None, gt=0, le=10_000_000, description="Stop after this many optimizer steps (at most 10 million)."
    )
    learning_rate: float | Literal["auto"] = Field(
        "auto",
        description="Peak learning rate. `auto`: from the model's width, 1e-3 x (2048 / hidden_size) ** 0.78 "
        "within [1e-4, 3e-3] (2.7e-3 for SmolLM2-135M, 5.8e-4 for an 8B Llama), x1.5 for runs of 100 steps or "
        "fewer (none from 1,000); the value used is in the run log and the adapter's metadata.",
    )
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps spent warming up.")
    batch_size: int = Field(4, gt=0, le=4096, description="Blocks per device per step (at most 4096).")
    gradient_accumulation: int = Field(1, gt=0, le=4096, description="Micro-batches per optimizer step (at most 4096).")
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
    weight_decay: float = Field(0.0, ge=0, le=10, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, le=1e6, description="Gradient clipping norm (0 disables).")
    seed: int = Field(
        42, ge=0, le=2**32 - 1, description="Seed for weights init, data order and dropout (0 to 2^32-1)."
    )
    logging_every: int = Field(5, gt=0, le=10_000_000, description="Log loss and tokens/s every N steps.")
    eval_every: int | None = Field(
        None, gt=0, le=10_000_000, description="Evaluate every N steps (always before and after training)."
    )
    save_every: int | None = Field(
        None, gt=0, le=10_000_000, description="Write a resumable checkpoint under runs/<name>/ every N steps."
    )
    keep_checkpoints: int = Field(2, gt=0, le=1000, description="How many checkpoints to keep.")
    report_to: list[Tracker] = Field(
        default_factory=list,
        description="Experiment trackers (transformers' integrations), e.g. [tensorboard]: event files in "
        "runs/<name>/tensorboard. Each needs its package (`pip install 'lorakit[tensorboard]'`).",
    )
    report_online: bool = Field(
        False,
        description="Let trackers that can send data (wandb, comet_ml, neptune, clearml, swanlab) send it; off: "
        "they run offline and keep everything under runs/<name>/.",
    )

    @field_validator("learning_rate", mode="before")
    @classmethod
    def _auto_or_number(cls, v: Any) -> Any:
        # Recipes read `1e-3` as a number (YAML 1.2); a quoted "1e-3" is text, as the JSON Schema sees it.
        if isinstance(v, str) and v != "auto":
            raise ValueError(f"must be 'auto' or a number like 2e-4, got {v!r}")
        return v

    @field_validator("learning_rate")
    @classmethod
    def _lr_range(cls, v: Any) -> Any:
        if isinstance(v, float) and not 0 < v < 1:
            raise ValueError(f"must be 'auto' or a number in (0, 1), got {v:g}")
        return v

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
