"""Runs in progress: checkpoints that are complete or ignored, and exact resume.

A checkpoint is `runs/<name>/checkpoint-<step>/` as transformers writes it (adapter weights,
optimizer, scheduler, RNG states of every library, trainer state with the data position) plus
the run's recipe (`run.json`). Once every process has written its part, the main process flushes
it to disk and only then marks it `.complete` (`callbacks.Checkpoints`). Resume only ever considers
checkpoints with the marker, so a checkpoint cut short by a crash is never used, and a new run
removes such leftovers before it writes its own."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from lorakit.data.content import Content
from lorakit.errors import LorakitError, short
from lorakit.fs import fsync_tree
from lorakit.recipe import Recipe

MARKER = ".complete"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"
# What a run writes in runs/<name>/ besides its checkpoints: a new run of that name replaces these, and only these.
RUN_FILES = (METRICS_FILE, RUN_FILE, f".{RUN_FILE}.tmp", f".{METRICS_FILE}.tmp")


class Interrupted(LorakitError):
    """Training stopped on Ctrl-C / SIGTERM after writing a checkpoint."""

    def __init__(self, step: int, checkpoint: Path | None):
        self.step = step
        self.checkpoint = checkpoint
        where = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint could be written"
        super().__init__(f"interrupted at step {step}; {where}")


def step_of(path: Path) -> int:
    try:
        return int(path.name.rsplit("-", 1)[-1])
    except ValueError:
        return -1


def checkpoints(run_dir: Path, complete_only: bool = True) -> list[Path]:
    """Checkpoints of a run, oldest first."""
    found = [p for p in run_dir.glob("checkpoint-*") if p.is_dir() and step_of(p) >= 0]
    if complete_only:
        found = [p for p in found if (p / MARKER).is_file()]
    return sorted(found, key=step_of)


def mark_complete(ckpt: Path) -> None:
    fsync_tree(ckpt)
    (ckpt / MARKER).write_text("ok\n")
    fsync_tree(ckpt)


def complete(ckpt: Path, run_dir: Path) -> None:
    """Finish a checkpoint every process has written: copy the run's recipe into it, flush it, mark it."""
    if (run_dir / RUN_FILE).is_file():
        shutil.copy2(run_dir / RUN_FILE, ckpt / RUN_FILE)
    mark_complete(ckpt)


def drop_unfinished(run_dir: Path) -> None:
    """Remove checkpoints without the marker (cut short by a crash): a new save of the same step must not find
    another run's files in its folder."""
    for p in checkpoints(run_dir, complete_only=False):
        if not (p / MARKER).exists():
            shutil.rmtree(p, ignore_errors=True)


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop older and unfinished ones. Never the newest."""
    done = checkpoints(run_dir)
    if not done:
        return
    newest = step_of(done[-1])
    for p in done[: max(0, len(done) - max(keep, 1))]:
        shutil.rmtree(p, ignore_errors=True)
    for p in checkpoints(run_dir, complete_only=False):
        if not (p / MARKER).exists() and step_of(p) < newest:
            shutil.rmtree(p, ignore_errors=True)


# Settings that change the shapes or the set of the adapter's tensors: a checkpoint of other ones cannot be loaded.
SHAPE_KEYS = ("lora.r", "lora.target_modules", "lora.use_dora", "lora.modules_to_save")


def resume_key(recipe: Recipe, base_fingerprint: str | None, content: Content) -> dict[str, Any]:
    """What a checkpoint's run must share with this one to continue it. The data's hash decides; its files'
    digests and settings are there so a refusal names the file or the key that changed."""
    lora = recipe.lora.model_dump(mode="json")
    return {
        "base_model": recipe.base_model.name,
        "base_fingerprint": base_fingerprint,
        "quantization": recipe.base_model.quantization,
        "data_content": content.hash,
        "data_files": content.short_files(),
        "data": content.settings,
        "lora": lora,
        "packing": recipe.data.packing,
        "seed": recipe.train.seed,
        "batch_size": recipe.train.batch_size,
        "gradient_accumulation": recipe.train.gradient_accumulation,
    }


def write_run(run_dir: Path, info: dict[str, Any]) -> None:
    tmp = run_dir / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(info, indent=2, default=str))
    tmp.replace(run_dir / RUN_FILE)


def read_run(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / RUN_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def find_resume(run_dir: Path, key: dict[str, Any], force: bool) -> tuple[Path, dict[str, Any]]:
    """The newest complete checkpoint, if the run it belongs to matches this recipe."""
    done = checkpoints(run_dir)
    if not done:
        raise LorakitError(f"--resume: no complete checkpoint in {run_dir} (set train.save_every to write them)")
    run = read_run(run_dir)
    changes = _diff(run.get("resume_key", {}), key)
    shapes = [c for c in changes if c.split(":")[0] in SHAPE_KEYS]
    if shapes:
        raise LorakitError(
            "--resume: the adapter's shape changed since the checkpoint was written, so its weights cannot be "
            "loaded (not even with --force):\n  " + "\n  ".join(shapes) + "\nstart over with --overwrite"
        )
    if changes and not force:
        raise LorakitError(
            "--resume: the recipe or its inputs changed since the checkpoint was written:\n  "
            + "\n  ".join(changes)
            + "\nresume anyway with --force, or start over with --overwrite"
        )
    check_readable(done[-1])
    return done[-1], run


def check_readable(ckpt: Path) -> None:
    """Read each file of a checkpoint the way resuming reads it (tensors only, no code), before any training:
    a damaged or tampered file is named, instead of failing in the middle of the trainer's start."""
    import torch
    from transformers.trainer_pt_utils import safe_globals  # the numpy types transformers' RNG state holds

    for f in sorted(ckpt.iterdir()):
        if f.name == "training_args.bin":  # transformers' pickled settings: written, never read back on resume
            continue
        try:
            if f.suffix in (".pt", ".pth"):
                with safe_globals():
                    torch.load(f, map_location="cpu", weights_only=True)
            elif f.suffix == ".json":
                json.loads(f.read_text())
            elif f.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(f), framework="numpy") as st:
                    st.keys()
        except Exception as e:  # pickle's, torch's, json's and safetensors' errors: the file is not what it says
            raise LorakitError(
                f"--resume: {f} cannot be read as a checkpoint file ({short(e)}); it is damaged or was not written "
                "by lorakit: remove that checkpoint folder to resume from an earlier one, or start over with "
                "--overwrite"
            ) from None


def clear_run_dir(run_dir: Path) -> None:
    """Make runs/<name>/ ready for a new run: remove what an earlier run of this name wrote (its log, its record,
    its checkpoints). Anything else in the folder was not made by lorakit and stays where it is."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for p in run_dir.iterdir():
        if p.name in RUN_FILES and not p.is_dir():
            p.unlink()
    for ckpt in checkpoints(run_dir, complete_only=False):
        shutil.rmtree(ckpt)


def trim_metrics(run_dir: Path, step: int) -> tuple[float, int]:
    """Resuming at `step`: drop the log rows of steps after it (trained again now) and return the summed training
    loss of the steps logged up to it, each logged loss counted for the steps it averages, and how many steps
    that covers (the last logged step)."""
    path = run_dir / METRICS_FILE
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0.0, 0
    kept, total, last = [], 0.0, 0
    for line in lines:
        try:
            row = json.loads(line)
            row_step = int(row["step"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
        if row_step > step:
            continue
        kept.append(line)
        if isinstance(row.get("loss"), int | float) and row_step > last:
            total += row["loss"] * (row_step - last)
            last = row_step
    tmp = run_dir / f".{METRICS_FILE}.tmp"
    tmp.write_text("".join(f"{line}\n" for line in kept))
    tmp.replace(path)
    return total, last


def check_fresh_start(run_dir: Path, overwrite: bool) -> None:
    if checkpoints(run_dir) and not overwrite:
        raise LorakitError(
            f"{run_dir} holds checkpoints of an unfinished run; continue it with --resume, "
            "or start over with --overwrite"
        )
