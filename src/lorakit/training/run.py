"""One training run: recipe -> checks -> data -> base model -> SFTTrainer -> adapter in the store."""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError
from lorakit.internals import keep_4bit_trainable_on_cpu
from lorakit.models.load import load_model
from lorakit.models.reference import ModelRef, describe, weights_fingerprint
from lorakit.plan import PER_DOCUMENT, Plan, probe
from lorakit.recipe import Recipe
from lorakit.store import adapters
from lorakit.store.metadata import AdapterMeta, build_meta
from lorakit.training import attention, checkpoints, runtime
from lorakit.training.callbacks import Checkpoints, EvalBefore, GracefulStop, NullDisplay, RunLog
from lorakit.training.preflight import data_summary, preflight, resolve_plan
from lorakit.training.trainer import build_lora_config, build_sft_config, packing_is_isolated, sft_trainer_class


@dataclass
class TrainResult:
    name: str
    path: Path
    metrics: dict[str, Any]
    meta: AdapterMeta


def load_base(recipe: Recipe, ref: ModelRef, plan: Plan) -> tuple[Any, Plan]:
    """Load the base model as the Plan says, and check its packing: kept only if documents stay apart.

    Returns the model and the Plan as the checks left it (packing off, or attention per document, with why)."""
    model = load_model(ref, plan, recipe.base_model.trust_remote_code, sharded=sharded_launch() is not None)
    model.config.use_cache = False
    if not plan.on_gpu:
        keep_4bit_trainable_on_cpu(model)
    if plan.packing != "padding-free":
        return model, plan
    per_document = plan.attn_implementation == PER_DOCUMENT
    if not packing_is_isolated(model):
        note = "this model's attention mixes packed documents: packing turned off (one document per row)"
        return model, plan.revised(
            note, packing="one per row", attn_implementation=None if per_document else plan.attn_implementation
        )
    kept_apart = "checked: packed documents do not attend to each other"
    if not per_document:
        return model, plan.revised(kept_apart)
    if attention.use_packed_attention(model):
        if packing_is_isolated(model):
            return model, plan.revised(kept_apart + ", with attention per document too")
        model.set_attn_implementation("sdpa")
    return model, plan.revised(
        kept_apart + " (per-document attention does not fit this model: sdpa)", attn_implementation=None
    )


def prepare_run_dir(recipe: Recipe, key: dict, overwrite: bool, resume: bool, force: bool):
    """runs/<name>/: fresh for a new run, or the newest complete checkpoint to resume from."""
    run_dir = Path(recipe.output.runs_dir) / recipe.adapter_name
    if resume:
        ckpt, info = checkpoints.find_resume(run_dir, key, force)
        return run_dir, str(ckpt), info
    checkpoints.check_fresh_start(run_dir, overwrite)
    if run_dir.exists() and is_main_process():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, None, {}


def is_main_process() -> bool:
    """Rank 0 under torchrun/accelerate (the only process that writes run files and adapters)."""
    return int(os.environ.get("RANK", "0")) == 0


def _quiet(message: str) -> None:
    """What the other processes of a distributed run say: nothing (the main process speaks for all)."""


def sharded_launch() -> str | None:
    """ "FSDP" or "DeepSpeed ZeRO-3" when `accelerate launch` shards the weights over processes, else None."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":  # set by `accelerate launch`
        return "FSDP"
    if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        return "DeepSpeed ZeRO-3"
    return None


def check_launch(recipe: Recipe) -> None:
    """Refuse, before anything loads, a launch that shards weights lorakit keeps quantized."""
    sharding = sharded_launch()
    if sharding is None:
        return
    if recipe.base_model.quantization != "none":
        raise LorakitError(
            f"base_model.quantization {recipe.base_model.quantization} cannot be combined with {sharding}: "
            "lorakit keeps quantized weights as integers, which it cannot shard; "
            "train a quantized base with DDP instead (examples/multi-gpu/ddp.yaml, or torchrun)"
        )


def train(
    recipe: Recipe, *, overwrite: bool = False, resume: bool = False, force: bool = False, show=None, say=print
) -> TrainResult:
    """Run one recipe end to end and write its adapter to the store."""
    say = say if is_main_process() else _quiet
    check_launch(recipe)
    machine = probe()
    if not machine.gpus:
        runtime.bound_cpu_kernel_cache()
    ref, config, targets, fan_in_fan_out, tokenizer, data = preflight(recipe, overwrite or resume)
    key = checkpoints.resume_key(recipe, weights_fingerprint(ref), data.content)
    run_dir, resume_from, run_info = prepare_run_dir(recipe, key, overwrite, resume, force)
    plan = resolve_plan(recipe, config, targets, fan_in_fan_out, data, machine)
    say(f"base model: {recipe.base_model.name} ({describe(ref)}, {config.model_type})")
    say(data_summary(data))
    model, plan = load_base(recipe, ref, plan)
    for line in plan.summary():
        say(line)
    train_ds, eval_ds = data.datasets()
    stop = GracefulStop(say)
    info = (
        run_info
        if resume_from
        else {"resume_key": key, "eval_loss_before": None, "recipe": recipe.model_dump(mode="json")}
    )
    before = EvalBefore(run_dir, info)
    trainer = sft_trainer_class()(
        model=model,
        args=build_sft_config(recipe, run_dir, plan, eval_ds is not None, eval_first=not resume_from),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=build_lora_config(recipe, plan),
        callbacks=[RunLog(run_dir / "metrics.jsonl", show or NullDisplay()),
                   Checkpoints(run_dir, recipe.train.keep_checkpoints), stop, before],
    )  # fmt: skip
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    say(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    if resume_from:
        say(f"resuming from {resume_from}")
    elif is_main_process():
        checkpoints.write_run(run_dir, info)  # the evaluation before the first step adds its loss (EvalBefore)
    started = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=resume_from)
    if stop.stopping:
        done = checkpoints.checkpoints(run_dir)
        raise checkpoints.Interrupted(trainer.state.global_step, done[-1] if done else None)
    elapsed = time.perf_counter() - started - before.seconds
    eval_after = trainer.evaluate()["eval_loss"] if eval_ds is not None else None
    metrics = {
        "train_loss": out.training_loss,
        "eval_loss_before": before.loss,
        "eval_loss_after": eval_after,
        "eval_perplexity_after": math.exp(eval_after) if eval_after is not None else None,
        "steps": trainer.state.global_step,
        "train_tokens_seen": trainer.state.num_input_tokens_seen,
        "train_runtime_s": round(elapsed, 2),
        "tokens_per_second": round(trainer.state.num_input_tokens_seen / max(elapsed, 1e-9), 1),
    }
    meta = build_meta(recipe, ref, config, tokenizer, trainable, data, plan, metrics)
    meta.base_model.fingerprint = key["base_fingerprint"]
    meta.data.content_hash = key["data_content"]
    path = plan_save(trainer, recipe, meta, overwrite)
    if trainer.is_world_process_zero():
        for ckpt in checkpoints.checkpoints(run_dir, complete_only=False):
            shutil.rmtree(ckpt, ignore_errors=True)
    return TrainResult(recipe.adapter_name, path, metrics, meta)


def plan_save(trainer, recipe: Recipe, meta: AdapterMeta, overwrite: bool) -> Path:
    """The main process writes the adapter; the others return once it is in place.

    FSDP and DeepSpeed shard the weights: every process takes part in gathering them first.
    """
    store = Path(recipe.output.store)
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped) if sharded else None
    path = adapters.adapter_dir(store, recipe.adapter_name)
    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        path = adapters.save_adapter(model, store, recipe.adapter_name, meta, overwrite, state_dict=state_dict)
    trainer.accelerator.wait_for_everyone()
    return path
