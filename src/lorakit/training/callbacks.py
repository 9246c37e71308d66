"""Trainer callbacks: the run log, checkpoints marked complete, the evaluation before training, Ctrl-C."""

from __future__ import annotations

import json
import signal
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from lorakit.training.checkpoints import complete, drop_unfinished, prune, read_run, write_run


class NullDisplay:
    def step(self, state) -> None: ...

    def log(self, row: dict, state) -> None: ...


class RunLog(TrainerCallback):
    """Writes every log line to runs/<name>/metrics.jsonl and keeps the ones the summary needs."""

    def __init__(self, path: Path, display):
        self.path = path
        self.display = display
        self.last_time: float | None = None
        self.last_tokens = 0
        self.history: list[dict[str, Any]] = []

    def on_train_begin(self, args, state, control, **kw):
        self.last_time = time.perf_counter()
        self.last_tokens = state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or logs is None:
            return
        row = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), **logs}
        now = time.perf_counter()
        if "loss" in logs and self.last_time is not None:
            seen = state.num_input_tokens_seen
            row["tokens_seen"] = seen
            row["tokens_per_second"] = round((seen - self.last_tokens) / max(now - self.last_time, 1e-9), 1)
            self.last_time, self.last_tokens = now, seen
        elif "eval_loss" in logs:  # evaluation time is not training time
            self.last_time, self.last_tokens = now, state.num_input_tokens_seen
        row["time"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.history.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.display.log(row, state)

    def on_step_end(self, args, state, control, **kw):
        if state.is_world_process_zero:
            self.display.step(state)


class Checkpoints(TrainerCallback):
    """Marks each checkpoint complete once every process has written it, then prunes old ones.

    transformers writes `checkpoint-<step>/` (each process its own part: RNG state, and its shards under
    FSDP/DeepSpeed) and then calls `on_save` in every process. The processes wait for each other, the main
    process alone flushes the checkpoint and marks it, and all wait again so that none reports a checkpoint
    before it is marked."""

    def __init__(self, run_dir: Path, keep: int):
        self.run_dir = run_dir
        self.keep = keep

    def on_train_begin(self, args, state, control, **kw):
        if state.is_world_process_zero:
            drop_unfinished(self.run_dir)
        wait_for_everyone()

    def on_save(self, args, state, control, **kw):
        wait_for_everyone()
        if state.is_world_process_zero:
            ckpt = self.run_dir / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                complete(ckpt, self.run_dir)
            prune(self.run_dir, self.keep)
        wait_for_everyone()


class EvalBefore(TrainerCallback):
    """The loss of the evaluation the trainer runs before its first step, added to run.json by the main process.

    The trainer runs it (`eval_on_start`) once the model is prepared for training. Calling `trainer.evaluate()`
    before `trainer.train()` instead prepares the model for evaluation only, and under DDP training then skips
    the wrapping that averages gradients: every process would train its own copy.
    """

    def __init__(self, run_dir: Path, info: dict[str, Any]):
        self.run_dir = run_dir
        self.info = info
        self.loss = info.get("eval_loss_before")
        self.seconds = 0.0  # not training time

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        if state.global_step == 0 and self.loss is None and metrics:
            self.loss = metrics.get("eval_loss")
            self.seconds = metrics.get("eval_runtime", 0.0)
            if state.is_world_process_zero:
                # merged into what run.json holds now (the run's status is kept there too)
                write_run(self.run_dir, {**read_run(self.run_dir), **self.info, "eval_loss_before": self.loss})


def any_process(flag: bool, device) -> bool:
    """True if `flag` is set in any process of a distributed run (in this process alone otherwise)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def wait_for_everyone() -> None:
    """Wait until every process of a distributed run gets here (nothing to wait for otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class GracefulStop(TrainerCallback):
    """First Ctrl-C / SIGTERM: finish the step, checkpoint, stop. A second one aborts at once.

    Under torchrun / accelerate every process gets the signal, though not necessarily in the same step: all
    processes stop at the first step end where any of them has it (one that kept training would wait
    forever for the others in its next gradient exchange).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, say=print):
        self.say = say
        self.requested = False  # a signal reached this process
        self.stopping = False  # every process stops after this step
        self.previous: dict[int, Any] = {}

    def request(self, signum=None, frame=None) -> None:
        if self.requested:
            self.restore()
            raise KeyboardInterrupt
        self.requested = True
        self.say("stopping after this step and writing a checkpoint (press Ctrl-C again to abort at once)")

    def on_train_begin(self, args, state, control, **kw):
        try:
            self.previous = {s: signal.signal(s, self.request) for s in self.SIGNALS}
        except ValueError:  # not the main thread: leave signals alone
            self.previous = {}

    def on_step_end(self, args, state, control, **kw):
        self.stopping = any_process(self.requested, args.device)
        if self.stopping:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kw):
        self.restore()

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}
