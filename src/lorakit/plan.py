"""The Plan: every automatic choice of a run or a verb, resolved once from the recipe (or an adapter's record)
and the machine, into one frozen object that is printed, saved with the adapter and read by every stage.

Nothing else in lorakit guesses a device, a dtype or a packing mode: a stage that needs one reads the Plan.
`probe()` is the only place that asks torch what the machine has (the tests simulate a CUDA machine there).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from lorakit.errors import LorakitError
from lorakit.recipe import BaseModelSection, Recipe

Precision = Literal["bf16", "fp16", "fp32"]
Dtype = Literal["float32", "bfloat16", "float16"]
DTYPE_OF = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# The attention the Plan picks for packed training on the CPU: sdpa run on each packed document's span
# (lorakit.training.attention; the same result as masked sdpa for a fraction of the work). Not a transformers
# name: the model loads with sdpa and training switches it after checking the two agree.
PER_DOCUMENT = "per-document sdpa"
# Share of a GPU's memory the weights of an inference model may take before lorakit spreads the model over
# every GPU (and the CPU) with device_map="auto": the rest is the CUDA context, activations and the KV cache.
FIT_SHARE = 0.8


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Gpu(Frozen):
    name: str
    memory: int  # bytes
    bf16: bool


class Machine(Frozen):
    """What this process can use: its GPUs, whether the CPU computes bf16 natively, its place in a launch."""

    gpus: tuple[Gpu, ...] = ()
    cpu_bf16: bool = False
    local_rank: int = 0
    world_size: int = 1


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def probe() -> Machine:
    """This machine, as torch reports it (LOCAL_RANK and WORLD_SIZE under torchrun / accelerate)."""
    import torch

    gpus: tuple[Gpu, ...] = ()
    if torch.cuda.is_available():
        bf16 = bool(torch.cuda.is_bf16_supported())
        gpus = tuple(
            Gpu(name=p.name, memory=int(p.total_memory), bf16=bf16)
            for p in (torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count()))
        )
    return Machine(
        gpus=gpus,
        cpu_bf16=cpu_has_bf16(),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
    )


class Plan(Frozen):
    """Every decision of one run or verb. Fields are plain values, so the Plan saves as JSON and reads back."""

    verb: str
    device: str  # "cpu" or "cuda:N": where the model (or its first part) sits
    device_map: Literal["auto"] | None = None  # "auto": spread over every GPU (and the CPU), for a model too big
    world_size: int = 1
    precision: Precision  # mixed precision of training; the dtype inference computes in
    weights_dtype: Dtype  # frozen base weights (of a quantized base: what it does not quantize)
    quantization: Literal["none", "4bit", "8bit"] = "none"
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Dtype = "float32"  # what 4-bit layers compute in
    attn_implementation: str | None = None  # None: transformers' default (sdpa where the model has it)
    gradient_checkpointing: bool = False
    packing: Literal["padding-free", "one per row", "none"] = "none"
    target_modules: tuple[str, ...] = ()
    fan_in_fan_out: bool = False
    lora_alpha: float | None = None
    lora_init: str = "peft default (A Kaiming-uniform, B zero)"
    learning_rate: float | None = None
    learning_rate_from: str = ""  # "recipe", or how `auto` was resolved
    steps: int | None = None
    steps_per_epoch: int | None = None
    eval_split: str = "none"
    notes: tuple[str, ...] = ()

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def revised(self, note: str, **changes) -> Plan:
        """The Plan with `changes` a check at load time made (packing turned off, say), and why."""
        return self.model_copy(update={**changes, "notes": (*self.notes, note)})

    def summary(self) -> list[str]:
        """The Plan as the run log prints it: a few lines a user can check."""
        where = self.device + (" (device_map auto: spread over every GPU and the CPU)" if self.device_map else "")
        if self.world_size > 1:
            where += f", {self.world_size} processes"
        quant = "" if self.quantization == "none" else f", {self.quantization} {self.quant_type}"
        if self.quantization == "4bit":
            quant += f" computing in {self.compute_dtype}"
        lines = [f"plan: device {where}, precision {self.precision}, weights {self.weights_dtype}{quant}"]
        if self.verb == "train":
            gc = "on" if self.gradient_checkpointing else "off"
            steps = f"{self.steps} steps ({self.steps_per_epoch} per epoch)" if self.steps else "steps after packing"
            attn = self.attn_implementation or "sdpa"
            lines.append(f"  gradient checkpointing {gc}; packing {self.packing}; attention {attn}; {steps}")
            alpha = f"{self.lora_alpha:g}" if self.lora_alpha is not None else "-"
            lr = f"{self.learning_rate:.2g}" + (f" ({self.learning_rate_from})" if self.learning_rate_from else "")
            lines.append(f"  eval: {self.eval_split}")
            lines.append(f"  lora alpha {alpha}, learning rate {lr}")
            lines.append(f"  target modules: {', '.join(self.target_modules)}")
        lines += [f"  {n}" for n in self.notes]
        return lines


def _base_choices(section: BaseModelSection, machine: Machine, precision: Precision) -> dict:
    """What training and inference decide alike: the device, precision, quantization and attention."""
    return {
        "device": f"cuda:{machine.local_rank}" if machine.gpus else "cpu",
        "precision": precision,
        "quantization": section.quantization,
        "quant_type": section.quant_type,
        "double_quant": section.double_quant,
        "compute_dtype": DTYPE_OF[precision] if section.compute_dtype == "auto" else section.compute_dtype,
        "attn_implementation": None if section.attn_implementation == "auto" else section.attn_implementation,
    }


# --- training -----------------------------------------------------------------------------------


def _precision(recipe: Recipe, machine: Machine) -> Precision:
    cuda = bool(machine.gpus)
    wanted = recipe.train.precision
    if wanted == "auto":
        if cuda:
            return "bf16" if machine.gpus[0].bf16 else "fp16"
        return "bf16" if machine.cpu_bf16 else "fp32"
    if wanted == "fp16" and not cuda:
        raise LorakitError("train.precision fp16 needs a GPU; on the CPU use bf16 or fp32")
    if wanted == "bf16" and cuda and not machine.gpus[0].bf16:
        raise LorakitError(f"train.precision bf16: this GPU ({machine.gpus[0].name}) has no bf16; use fp16 or auto")
    return wanted


def _weights_dtype(section: BaseModelSection, precision: Precision, cuda: bool) -> tuple[Dtype, str | None]:
    """The frozen base weights' dtype, and a note when the choice is worth a line in the log."""
    if section.dtype != "auto":
        return section.dtype, None
    if cuda:
        return ("bfloat16" if precision == "bf16" else "float16"), None
    if precision == "bf16" and section.quantization in ("none", "4bit"):
        # Autocast would round every frozen weight to bf16 at every use anyway (frozen weights are not in its
        # cache): hold them in bf16 once, as on a GPU. The adapter itself stays fp32. A 4-bit base keeps what it
        # does not quantize (embeddings, norms) in bf16 too: in float32 the residual stream stayed float32 and
        # every 4-bit layer answered in float32 (QLoRA on SmolLM2-135M, CPU: 2.64 vs 3.95 s a step).
        return "bfloat16", "frozen base weights held in bf16"
    return "float32", None


def plan_training(
    recipe: Recipe,
    machine: Machine,
    targets: list[str] | str,
    fan_in_fan_out: bool = False,
    packed_rows: int | None = None,
    eval_split: str = "none",
    hidden_size: int | None = None,
) -> Plan:
    """Every automatic choice of a training run. `packed_rows`: training rows once packed (for the step count);
    `hidden_size`: the model's width (for the automatic learning rate)."""
    t, base = recipe.train, recipe.base_model
    cuda = bool(machine.gpus)
    if cuda and machine.local_rank >= len(machine.gpus):
        raise LorakitError(f"LOCAL_RANK {machine.local_rank} but this machine has {len(machine.gpus)} GPU(s)")
    precision = _precision(recipe, machine)
    weights, note = _weights_dtype(base, precision, cuda)
    # A quantized base is chosen for memory: there checkpointing is worth its recomputation on the CPU too
    # (measured, QLoRA on SmolLM2-135M: 40-46% less peak memory for 11-25% fewer tokens/s).
    gc = {"on": True, "off": False, "auto": cuda or base.quantization != "none"}[t.gradient_checkpointing]
    steps = per_epoch = None
    if packed_rows is not None:
        per_epoch, steps = training_steps(recipe, packed_rows, machine.world_size)
    if t.learning_rate == "auto":
        lr, lr_from = auto_learning_rate(hidden_size, steps)
    else:
        lr, lr_from = t.learning_rate, "recipe"
    return Plan(
        verb="train",
        world_size=machine.world_size,
        weights_dtype=weights,
        **{**_base_choices(base, machine, precision), "attn_implementation": _training_attention(recipe, cuda)},
        gradient_checkpointing=gc,
        packing="padding-free" if recipe.data.packing else "one per row",
        target_modules=tuple(targets) if isinstance(targets, list) else (targets,),
        fan_in_fan_out=fan_in_fan_out,
        lora_alpha=recipe.lora.alpha if recipe.lora.alpha is not None else LORA_ALPHA,
        learning_rate=lr,
        learning_rate_from=lr_from,
        steps=steps,
        steps_per_epoch=per_epoch,
        eval_split=eval_split,
        notes=(note,) if note else (),
    )


# The default LoRA alpha, whatever the rank: the update is scaled by alpha / r, which keeps the best learning rate
# where it is when r changes (LoRA Without Regret, Thinking Machines Lab, 2025: with alpha fixed at 32 the optimal
# learning rate was about the same from rank 1 to 512). alpha = 2r, lorakit's earlier default, gave r=16 the same
# scale and every other rank a different optimum.
LORA_ALPHA = 32.0

# The automatic learning rate: LR_AT_2048 x (2048 / hidden_size) ** LR_WIDTH_EXPONENT, within LR_RANGE.
# - LoRA wants about 10x full fine-tuning's learning rate, and the best rate falls as models widen (LoRA Without
#   Regret, 2025). The width exponent is the one tinker-cookbook's `hyperparam_utils.get_lr` used for Llama-family
#   models (5e-5 x 10 x (2000 / hidden_size) ** 0.781).
# - The anchor is that project's later sweep (tulu3 SFT, LoRA rank 32 alpha 32, batch 128): 1e-3 was best for
#   Llama-3.2-1B/3B (hidden 2048/3072) and Qwen3-4B/8B (2560/4096), 3e-4 for Llama-3.1-8B/70B (4096/8192). The rule
#   gives 1.0e-3, 7.3e-4, 8.4e-4, 5.8e-4 and 3.4e-4 there: within a factor of two of every best swept value.
# - On lorakit's embedded SmolLM2-135M (hidden 576) it gives 2.7e-3; bench/quality.py measures where that lands in a
#   sweep on three corpora (bench/results/quality.md).
# - The range keeps tiny and very wide models away from the extrapolated ends of the rule.
# - Short runs want more: LoRA's B starts at zero, so its first steps move the model less than full fine-tuning's,
#   and LoRA Without Regret found the best ratio to full fine-tuning's rate nearer 15x than 10x in short runs. A run of
#   SHORT_RUN_STEPS[0] steps or fewer gets SHORT_RUN_FACTOR times the rate, one of SHORT_RUN_STEPS[1] or more none of
#   it, log-linearly between. Measured on the embedded model (8-step runs, bench/results/quality.md): with the
#   factor (4e-3) the defaults came within +1.9%, -2.7% and -10.9% of the best swept rate's loss reduction on code,
#   prose and structured text; without it (2.7e-3), 71% of the best on the structured text.
LR_AT_2048 = 1e-3
LR_WIDTH_EXPONENT = 0.78
LR_RANGE = (1e-4, 3e-3)
LR_UNKNOWN_WIDTH = 2e-4
SHORT_RUN_STEPS = (100, 1000)
SHORT_RUN_FACTOR = 1.5


def short_run_factor(steps: int | None) -> float:
    """How much more learning rate a run of `steps` optimizer steps gets (1 when the count is unknown)."""
    lo, hi = SHORT_RUN_STEPS
    if not steps or steps >= hi:
        return 1.0
    if steps <= lo:
        return SHORT_RUN_FACTOR
    return SHORT_RUN_FACTOR ** (math.log(hi / steps) / math.log(hi / lo))


def auto_learning_rate(hidden_size: int | None, steps: int | None = None) -> tuple[float, str]:
    """The learning rate `auto` resolves to for a model `hidden_size` wide trained for `steps` optimizer steps (None:
    not known yet), and a note of how."""
    if not hidden_size:
        return LR_UNKNOWN_WIDTH, "auto: the model's config gives no hidden size"
    raw = LR_AT_2048 * (2048 / hidden_size) ** LR_WIDTH_EXPONENT
    how = f"auto: {LR_AT_2048:g} x (2048 / hidden size {hidden_size}) ^ {LR_WIDTH_EXPONENT:g}"
    if not LR_RANGE[0] <= raw <= LR_RANGE[1]:
        how += f" = {raw:.2g}, held to [{LR_RANGE[0]:g}, {LR_RANGE[1]:g}]"
    width = min(max(raw, LR_RANGE[0]), LR_RANGE[1])
    factor = short_run_factor(steps)
    if factor != 1.0:
        how += f", x {factor:.2g} for a short run ({steps} steps)"
    return float(f"{width * factor:.2g}"), how


def _training_attention(recipe: Recipe, cuda: bool) -> str | None:
    wanted = recipe.base_model.attn_implementation
    if wanted != "auto":
        return wanted
    return PER_DOCUMENT if recipe.data.packing and not cuda else None


def training_steps(recipe: Recipe, rows: int, world_size: int = 1) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps) as transformers' Trainer counts them for `rows` training rows."""
    t = recipe.train
    batches = math.ceil(rows / (t.batch_size * world_size))  # each process's dataloader length
    per_epoch = max(batches // t.gradient_accumulation + int(batches % t.gradient_accumulation > 0), 1)
    return per_epoch, (t.max_steps or math.ceil(t.epochs * per_epoch))


# --- inference ----------------------------------------------------------------------------------


def plan_inference(
    verb: str, section: BaseModelSection, machine: Machine, n_params: int = 0, dtype: Dtype | None = None
) -> Plan:
    """Where and in what dtype `verb` runs a base (+ adapters): one GPU when the weights fit it, every GPU and the
    CPU (device_map auto) when they do not, the CPU without a GPU. `dtype` forces the weights' dtype (merge)."""
    cuda = bool(machine.gpus)
    quantized = section.quantization != "none"
    if cuda:
        precision: Precision = "bf16" if machine.gpus[0].bf16 else "fp16"
    else:
        precision = "bf16" if quantized else "fp32"  # bitsandbytes' CPU 4-bit kernels compute in bf16
    if dtype is None:
        dtype = section.dtype if section.dtype != "auto" else ("float32" if not cuda else DTYPE_OF[precision])
    device_map = None
    notes: list[str] = []
    if cuda and not quantized and n_params:
        size = n_params * {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
        if size > FIT_SHARE * machine.gpus[0].memory:
            device_map = "auto"
            notes.append(f"weights ({size / 2**30:.1f} GB) do not fit one GPU: spread over every GPU and the CPU")
    return Plan(
        verb=verb,
        device_map=device_map,
        weights_dtype=dtype,
        **_base_choices(section, machine, precision),
        notes=tuple(notes),
    )
