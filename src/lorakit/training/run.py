"""One training run: recipe -> checks -> data -> base model -> SFTTrainer -> adapter in the store."""

from __future__ import annotations

import errno
import hashlib
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError
from lorakit.fs import cache_dir, held_lock
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
    if is_main_process():
        checkpoints.clear_run_dir(run_dir)
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
    recipe: Recipe,
    *,
    overwrite: bool = False,
    resume: bool = False,
    force: bool = False,
    show=None,
    say=print,
    command: list[str] | None = None,
) -> TrainResult:
    """Run one recipe end to end and write its adapter to the store.

    One run per adapter name at a time: once its inputs are checked, the main process holds runs/<name>/.lock to
    the end, and a second run of that name is refused there, naming the process that holds it."""
    main = is_main_process()
    say = say if main else _quiet
    check_launch(recipe)
    machine = probe()
    if not machine.gpus:
        runtime.bound_cpu_kernel_cache()
    checked = preflight(recipe, overwrite or resume)
    run_dir = Path(recipe.output.runs_dir) / recipe.adapter_name
    if run_dir.exists() and not run_dir.is_dir():
        raise LorakitError(f"{run_dir} is a file, not a folder; lorakit keeps the run's log and checkpoints there")
    what = f"training of adapter {recipe.adapter_name!r}"
    with (
        held_lock(run_dir / checkpoints.LOCK_FILE, what) if main else nullcontext(),
        held_lock(store_lock(recipe), what) if main else nullcontext(),  # the same name from another runs_dir
    ):
        return _train(recipe, checked, machine, overwrite, resume, force, show, say, command)


def store_lock(recipe: Recipe) -> Path:
    """The lock of an adapter name in its store, kept in lorakit's cache (nothing extra in the store)."""
    where = str(Path(recipe.output.store).resolve() / recipe.adapter_name)
    return cache_dir() / "locks" / f"{recipe.adapter_name}-{hashlib.sha256(where.encode()).hexdigest()[:12]}.lock"


def _train(
    recipe: Recipe, checked, machine, overwrite: bool, resume: bool, force: bool, show, say, command=None
) -> TrainResult:
    ref, config, targets, fan_in_fan_out, tokenizer, data = checked
    key = checkpoints.resume_key(recipe, weights_fingerprint(ref), data.content)
    run_dir, resume_from, run_info = prepare_run_dir(recipe, key, overwrite, resume, force)
    if resume_from:  # the run was started with --overwrite: its resumption may replace the adapter too
        overwrite = overwrite or bool(run_info.get("overwrite"))
        if adapters.exists(recipe.output.store, recipe.adapter_name) and not overwrite:
            raise LorakitError(
                f"adapter {recipe.adapter_name!r} already exists in {Path(recipe.output.store).resolve()}; "
                "resume with --overwrite to replace it when the run ends"
            )
    plan = resolve_plan(recipe, config, targets, fan_in_fan_out, data, machine)
    say(f"base model: {recipe.base_model.name} ({describe(ref)}, {config.model_type})")
    say(data_summary(data))
    from lorakit.training.planner import fit_warning

    for line in fit_warning(recipe, plan, config, machine):
        say(line)
    model, plan = load_base(recipe, ref, plan)
    for line in plan.summary():
        say(line)
    train_ds, eval_ds = data.datasets()
    stop = GracefulStop(say)
    info = (
        run_info
        if resume_from
        else {
            "resume_key": key,
            "eval_loss_before": None,
            "overwrite": overwrite,
            "recipe": recipe.model_dump(mode="json"),
        }
    )
    before = EvalBefore(run_dir, info)
    tracker_environment(recipe, run_dir)
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
    loss_before, steps_before = 0.0, 0  # the summed training loss of the steps logged before this resumption
    resumed_at = checkpoints.step_of(Path(resume_from)) if resume_from else 0
    if resume_from:
        say(f"resuming from {resume_from}")
        if is_main_process():
            loss_before, steps_before = checkpoints.trim_metrics(run_dir, resumed_at)
    elif is_main_process():
        checkpoints.write_run(run_dir, info)  # the evaluation before the first step adds its loss (EvalBefore)
    started = time.perf_counter()
    status = RunStatus(run_dir, command, plan.steps, is_main_process())
    try:
        out = trainer.train(resume_from_checkpoint=resume_from)
    except BaseException as e:  # torch.save and safetensors report a full disk as RuntimeError / SafetensorError
        status.failed(e)
        if not isinstance(e, Exception) or not disk_full(e, run_dir):
            raise
        done = checkpoints.checkpoints(run_dir)
        kept = (
            f"the last complete checkpoint, {done[-1].name}, is kept: free some space, then add --resume"
            if done
            else "no checkpoint was complete yet: free some space and start again"
        )
        where = getattr(e, "filename", None) or run_dir
        raise LorakitError(f"the disk filled while training (writing {where}); {kept}") from None
    if stop.stopping:
        done = checkpoints.checkpoints(run_dir)
        status.update("interrupted", reason="stopped by a signal (Ctrl-C or SIGTERM)")
        raise checkpoints.Interrupted(trainer.state.global_step, done[-1] if done else None)
    elapsed = time.perf_counter() - started - before.seconds
    eval_after = trainer.evaluate()["eval_loss"] if eval_ds is not None else None
    steps = trainer.state.global_step
    trained_now = steps - resumed_at  # the whole run's mean: the steps logged before, and this session's
    metrics = {
        "train_loss": (loss_before + out.training_loss * trained_now) / max(steps_before + trained_now, 1),
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
    status.update("completed", adapter=str(path), metrics=metrics)
    return TrainResult(recipe.adapter_name, path, metrics, meta)


class RunStatus:
    """The run's state in runs/<name>/run.json for `lorakit runs`: running (its process holds the lock), completed,
    interrupted or failed (and why); the command that started it, for the resume command."""

    def __init__(self, run_dir: Path, command: list[str] | None, steps: int | None, main: bool):
        self.run_dir, self.main = run_dir, main
        self.update("running", command=command, total_steps=steps, reason=None, pid=os.getpid(),
                    started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))  # fmt: skip

    def update(self, status: str, **fields) -> None:
        if not self.main:
            return
        try:
            info = checkpoints.read_run(self.run_dir)
            info.update(fields, status=status)
            if status != "running":
                info["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            checkpoints.write_run(self.run_dir, info)
        except OSError:  # the record is a convenience: a full disk must not hide the real error
            pass

    def failed(self, e: BaseException) -> None:
        if isinstance(e, KeyboardInterrupt):
            self.update("interrupted", reason="aborted (a second Ctrl-C)")
        else:
            self.update("failed", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")


# Trackers that can send data, and how each is told to stay offline (nothing leaves the machine unless the recipe
# sets train.report_online).
OFFLINE = {"WANDB_MODE": "offline", "COMET_MODE": "OFFLINE", "NEPTUNE_MODE": "offline", "CLEARML_OFFLINE_MODE": "1",
           "SWANLAB_MODE": "offline"}  # fmt: skip


def tracker_environment(recipe: Recipe, run_dir: Path) -> None:
    """Where the trackers write (under runs/<name>/) and, unless the recipe lets them, that they stay offline."""
    if not recipe.train.report_to:
        return
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")
    os.environ.setdefault("MLFLOW_TRACKING_URI", (run_dir / "mlruns").resolve().as_uri())
    os.environ.setdefault("WANDB_DIR", str(run_dir))
    os.environ.setdefault("TRACKIO_DIR", str(run_dir / "trackio"))
    if not recipe.train.report_online:
        os.environ.update(OFFLINE)


def disk_full(e: Exception, where: Path) -> bool:
    """Whether `e` is a write that failed for want of space: an OSError that says so, or torch's and safetensors'
    own errors for it (their text, or a disk with almost nothing left)."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(e)
    if "No space left on device" in text or "Disk quota exceeded" in text:
        return True
    if "failed writing" in text or "write failed" in text:  # PytorchStreamWriter, safetensors
        try:
            return shutil.disk_usage(where).free < 64 << 20
        except OSError:
            return False
    return False


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
        run_log = Path(recipe.output.runs_dir) / recipe.adapter_name / checkpoints.METRICS_FILE
        path = adapters.save_adapter(
            model, store, recipe.adapter_name, meta, overwrite, state_dict=state_dict, run_log=run_log
        )
    trainer.accelerator.wait_for_everyone()
    return path
