"""`lorakit plan --probe K`: K real training steps on this machine, their speed and peak memory, and the ETA of the
whole run at that speed. Nothing is kept: the adapter and the run folder are temporary."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from lorakit.recipe import Recipe


def peak_rss() -> int:
    """This process's peak resident memory (VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s" if m else f"{s} s"


def probe_run(recipe: Recipe, steps: int, run_steps: int | None) -> dict:
    """Train `steps` optimizer steps of the recipe (no evaluation) in a temporary folder; measured figures."""
    import torch

    from lorakit.training.run import train

    with tempfile.TemporaryDirectory(prefix="lorakit-probe-") as tmp:
        body = recipe.model_copy(deep=True)
        body.train.max_steps = steps
        body.train.eval_every = None
        body.train.save_every = None
        body.data.eval_split = 0.0 if not isinstance(body.data.eval_split, str) else body.data.eval_split
        body.output.store = str(Path(tmp) / "adapters")
        body.output.runs_dir = str(Path(tmp) / "runs")
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        result = train(body, overwrite=True, say=lambda *_: None)
        total = time.perf_counter() - started
    m = result.metrics
    per_step = m["train_runtime_s"] / max(m["steps"], 1)
    out = {
        "steps": m["steps"],
        "device": result.meta.plan.device if result.meta.plan else ("cuda" if cuda else "cpu"),
        "seconds_per_step": per_step,
        "tokens_per_second": m["tokens_per_second"],
        "peak_memory": torch.cuda.max_memory_allocated() if cuda else peak_rss(),
        "peak_kind": "torch.cuda.max_memory_allocated" if cuda else "process peak RSS",
        "seconds_with_loading": round(total, 1),
        "run_steps": run_steps,
    }
    if run_steps:
        out["eta"] = duration(per_step * run_steps)
    return out
