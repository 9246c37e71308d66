"""`lorakit plan`: the run a recipe describes, settled before anything is loaded. The Plan for the target device,
parameter counts, the data as it will be trained, the memory estimate (lorakit.estimate), a verdict for common GPU
sizes with what to change where it does not fit, and the largest block and batch that fit a given GPU."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError
from lorakit.estimate import (
    VERDICT_SIZES,
    Estimate,
    GiB,
    GpuSpec,
    Memory,
    Settings,
    Sizes,
    Trace,
    estimate,
    memory,
    settings_of,
)
from lorakit.models.architecture import (
    check_quantizable,
    choose_targets,
    load_config,
    repeated_layers,
    skeleton,
    with_layers,
)
from lorakit.models.reference import describe, resolve
from lorakit.plan import Gpu, Machine, Plan, plan_training, probe
from lorakit.recipe import Recipe
from lorakit.training.preflight import eval_description, hidden_size, packed_rows

GENERIC_GPU = Gpu(name="a GPU", memory=80 * GiB, bf16=True)  # for the verdict table when planning on the CPU


@dataclass
class Costed:
    """One device's plan and estimate; `memory_with` re-estimates it with changed settings."""

    plan: Plan
    estimate: Estimate
    settings: Settings
    trace: Trace | None
    sizes: Sizes  # the base model's weights (their size under other quantizations)
    config: Any

    def memory_with(self, **changes) -> Memory:
        settings = self.settings.replace(**changes)
        if self.trace is None:
            from lorakit.estimate import Shape

            t = Trace(Shape(settings.rows, settings.length), [0], [0], 0, 0)
        else:
            t = self.trace
        if "quantization" in changes and changes["quantization"] != "none" and self.settings.quantization == "none":
            settings = settings.replace(compute_dtype="bfloat16" if settings.cuda else settings.compute_dtype)
        return memory(t, self.sizes, self.config, settings, self.estimate.trainable)


@dataclass
class Report:
    recipe: Recipe
    base: str  # how the base model was found
    model_type: str
    target: Costed
    gpu: GpuSpec | None  # the --gpu asked for (None: this machine)
    data: dict[str, Any] | None  # the data as it will be trained; None when it could not be read (and why in notes)
    cuda: Costed | None = None  # for the verdict table: the target itself on a GPU, else a generic GPU
    notes: list[str] = field(default_factory=list)

    @property
    def estimate(self) -> Estimate:
        return self.target.estimate

    def memory_with(self, **changes) -> Memory:
        return self.target.memory_with(**changes)

    def budget(self) -> int | None:
        """The target's memory: the GPU's; None on the CPU (no fixed budget)."""
        return self.gpu.memory if self.gpu else None

    def verdicts(self) -> list[dict[str, Any]]:
        """Fits or not on each common GPU size, with the peak there."""
        costed = self.cuda or self.target
        peak = costed.estimate.memory.peak
        return [{"gib": g, "fits": peak <= g * GiB, "peak": peak} for g in VERDICT_SIZES]

    def advice(self, budget: int, costed: Costed | None = None) -> list[dict[str, Any]]:
        """What to change, cheapest first, each step applied on top of the ones before, until the run fits."""
        costed = costed or self.cuda or self.target
        s, r = costed.settings, self.recipe
        steps: list[tuple[str, dict]] = []
        if not s.gradient_checkpointing:
            steps.append(("train.gradient_checkpointing: on", {"gradient_checkpointing": True}))
        if s.quantization == "none":
            steps.append(("base_model.quantization: 4bit (QLoRA)", {"quantization": "4bit", "double_quant": True}))
        rows, accum = s.rows, r.train.gradient_accumulation
        while rows > 1:
            rows //= 2
            accum *= 2
            steps.append((f"train.batch_size: {rows} with train.gradient_accumulation: {accum} (same tokens a step)",
                          {"rows": rows}))  # fmt: skip
        if s.optimizer.startswith("adamw_torch"):
            steps.append(("train.optimizer: paged_adamw_8bit", {"optimizer": "paged_adamw_8bit"}))
        length = s.length
        while length > 256:
            length //= 2
            steps.append((f"data.block_size: {length}", {"length": length}))
        out, applied = [], {}
        if costed.estimate.memory.peak <= budget:
            return out
        for text, change in steps:
            applied.update(change)
            m = costed.memory_with(**applied)
            out.append({"change": text, "peak": m.peak, "fits": m.peak <= budget})
            if m.peak <= budget:
                break
        return out

    def fit(self, budget: int, costed: Costed | None = None) -> list[dict[str, int]]:
        """For each micro-batch size, the largest block (a multiple of 128 up to the model's context) that fits."""
        costed = costed or self.cuda or self.target
        text = self.target.config
        text = text.get_text_config() if hasattr(text, "get_text_config") else text
        top = int(getattr(text, "max_position_embeddings", 0) or 32768)
        rows = []
        for batch in (1, 2, 4, 8, 16):
            lo, hi, best = 1, top // 128, 0
            while lo <= hi:
                mid = (lo + hi) // 2
                if costed.memory_with(rows=batch, length=mid * 128).peak <= budget:
                    best, lo = mid, mid + 1
                else:
                    hi = mid - 1
            if best:
                rows.append({"batch": batch, "block_size": best * 128,
                             "peak": costed.memory_with(rows=batch, length=best * 128).peak})  # fmt: skip
        return rows


def target_machine(gpu: GpuSpec | None) -> Machine:
    if gpu is None:
        return probe()
    return Machine(gpus=(Gpu(name=gpu.name, memory=gpu.memory, bf16=gpu.bf16),))


def costed(recipe: Recipe, machine: Machine, config, targets, fan_in_fan_out: bool, rows, eval_desc: str) -> Costed:
    plan = plan_training(recipe, machine, targets, fan_in_fan_out, rows, eval_desc, hidden_size(config))
    est, sizes, t = estimate(recipe, plan, config)
    return Costed(plan, est, settings_of(recipe, plan).replace(chunked_loss=est.memory.loss_path == "chunked"), t,
                  sizes, config)  # fmt: skip


def plan_recipe(recipe: Recipe, gpu: GpuSpec | None = None, data: bool = True) -> Report:
    """Everything `lorakit plan` reports, from the recipe and the model's config (no weights read)."""
    ref = resolve(recipe.base_model.name, recipe.base_model.revision)
    config = load_config(ref, recipe.base_model.trust_remote_code)
    # every layer alike: a two-layer copy has the same layer names (and builds in a fraction of the time)
    meta = skeleton(
        ref, recipe.base_model.trust_remote_code, with_layers(config, 2) if repeated_layers(config) else config
    )
    check_quantizable(meta, recipe.base_model)
    targets, fan_in_fan_out = choose_targets(meta, recipe.lora.target_modules)
    notes: list[str] = []
    info, rows, eval_desc = None, None, "none"
    if data:
        try:
            info, rows, eval_desc = data_report(recipe, ref)
        except LorakitError as e:
            notes.append(f"data not measured: {e}")
    machine = target_machine(gpu)
    target = costed(recipe, machine, config, targets, fan_in_fan_out, rows, eval_desc)
    cuda = target
    if not target.plan.on_gpu:
        cuda = costed(recipe, Machine(gpus=(GENERIC_GPU,)), config, targets, fan_in_fan_out, rows, eval_desc)
    if target.estimate.note:
        notes.append(target.estimate.note)
    base = f"{recipe.base_model.name} ({describe(ref)}, {config.model_type})"
    return Report(recipe, base, config.model_type, target, gpu, info, cuda, notes)


def data_report(recipe: Recipe, ref) -> tuple[dict[str, Any], int, str]:
    """The data as training will see it: documents, tokens, pieces, packed blocks, efficiency, steps, mix."""
    from lorakit.data.prepare import prepare
    from lorakit.models.tokenizer import load_tokenizer
    from lorakit.plan import training_steps

    try:
        tokenizer = load_tokenizer(ref, recipe.base_model.trust_remote_code)
    except LorakitError:
        raise LorakitError(
            f"{recipe.base_model.name} has no tokenizer (a folder with only config.json?): the estimate assumes "
            "full blocks"
        ) from None
    prepared = prepare(recipe.data, tokenizer, recipe.train.seed)
    rows = packed_rows(prepared, recipe)
    r = prepared.report
    block = recipe.data.block_size
    per_epoch, steps = training_steps(recipe, rows)
    documents = sum(s["documents"] for s in r["sources"])
    examples = sum(s["examples"] for s in r["sources"])
    info = {
        "documents": documents,
        "examples": r["train_examples"],
        "pieces_beyond_documents": max(0, examples - documents),  # long documents split into block-sized pieces
        "train_tokens": r["train_tokens"],
        "supervised_tokens": r.get("supervised_tokens"),
        "eval_tokens": r["eval_tokens"],
        "packed_blocks": rows,
        "packing_efficiency": r["train_tokens"] / max(rows * block, 1) if recipe.data.packing else None,
        "steps_per_epoch": per_epoch,
        "steps": steps,
        "mix": [
            {
                "source": Path(s["path"]).name,
                "format": s["format"],
                "documents": s["documents"],
                "share": s["share"],
                "weight": s["weight"],
            }
            for s in r["sources"]
        ],  # fmt: skip
    }
    return info, rows, eval_description(recipe, prepared)


def available_memory(plan: Plan, machine: Machine) -> tuple[int, str] | None:
    """What the run's device offers: the GPU's memory, or on the CPU the memory the system has available now."""
    if plan.on_gpu and machine.gpus:
        gpu = machine.gpus[min(machine.local_rank, len(machine.gpus) - 1)]
        return gpu.memory, gpu.name
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "this machine's available memory"
    except OSError:
        pass
    return None


def fit_warning(recipe: Recipe, plan: Plan, config, machine: Machine) -> list[str]:
    """`lorakit train`, before loading: lines warning that the estimate exceeds the device, with the plan's advice
    (empty when it fits, or when the estimate cannot be made)."""
    offered = available_memory(plan, machine)
    if offered is None:
        return []
    budget, where = offered
    try:
        est, sizes, t = estimate(recipe, plan, config)
    except Exception:  # noqa: BLE001  (an estimate that cannot be made must never stop a run)
        return []
    if est.memory.peak <= budget:
        return []
    c = Costed(plan, est, settings_of(recipe, plan).replace(chunked_loss=est.memory.loss_path == "chunked"), t,
               sizes, config)  # fmt: skip
    report = Report(recipe, "", "", c, None, None, c)
    lines = [
        f"warning: lorakit plan estimates this run's peak at {est.memory.peak / GiB:.2f} GiB, more than "
        f"{where} ({budget / GiB:.2f} GiB); it may run out of memory. What would fit, cheapest first:"
    ]
    lines += [
        f"  - {a['change']}: {a['peak'] / GiB:.2f} GiB" + (" (fits)" if a["fits"] else "")
        for a in report.advice(budget, c)
    ]
    return lines
