"""Run history (`lorakit runs`): every run in the runs folder with its status, progress, eval losses and adapter."""

from __future__ import annotations

import json
import shlex
import shutil
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError
from lorakit.fs import lock_holder
from lorakit.training import checkpoints


def metrics_rows(run_dir: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        lines = (run_dir / checkpoints.METRICS_FILE).read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _seconds(a: str | None, b: str | None) -> float | None:
    try:
        start = datetime.strptime(a, "%Y-%m-%dT%H:%M:%S%z")
        end = datetime.strptime(b, "%Y-%m-%dT%H:%M:%S%z") if b else None
    except (TypeError, ValueError):
        return None
    return ((end.timestamp() if end else time.time()) - start.timestamp()) if start else None


def run_row(run_dir: Path) -> dict[str, Any]:
    """One run's state, as `lorakit runs` shows it."""
    info = checkpoints.read_run(run_dir)
    rows = metrics_rows(run_dir)
    holder = lock_holder(run_dir / checkpoints.LOCK_FILE)
    done = checkpoints.checkpoints(run_dir)
    status, reason = info.get("status"), info.get("reason")
    if holder:
        status, reason = "running", None
    elif status == "running" or status is None:  # its process is gone without saying how it ended
        if done:
            status, reason = "interrupted", "the process ended without finishing (killed or crashed)"
        else:
            status = "failed"
            reason = "the process ended without finishing (killed or crashed), no checkpoint written"
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    steps = max((r.get("step", 0) for r in rows), default=0)
    resume = None
    if status == "interrupted" and done and info.get("command"):
        resume = shlex.join([*info["command"], "--resume"])
    return {
        "name": run_dir.name,
        "status": status,
        "pid": (holder or {}).get("pid") if holder else None,
        "reason": reason,
        "steps": steps,
        "total_steps": info.get("total_steps"),
        "last_eval_loss": evals[-1] if evals else None,
        "best_eval_loss": min(evals) if evals else None,
        "started": info.get("started"),
        "seconds": _seconds(info.get("started"), info.get("finished") if status != "running" else None),
        "adapter": info.get("adapter") if status == "completed" else None,
        "checkpoint": str(done[-1]) if done else None,
        "resume": resume,
        "path": str(run_dir),
    }


def list_runs(runs_dir: str | Path) -> list[dict[str, Any]]:
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    return [run_row(d) for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]


def find_run(runs_dir: str | Path, name: str) -> Path:
    d = Path(runs_dir) / name
    if "/" in name or name.startswith(".") or not d.is_dir():
        known = ", ".join(r["name"] for r in list_runs(runs_dir)) or "none"
        raise LorakitError(f"no run {name!r} in {Path(runs_dir).resolve()} (runs: {known})")
    return d


def remove_run(runs_dir: str | Path, name: str, confirm: Callable[[Path], bool] | None = None) -> Path | None:
    """Delete a run's folder (never a running one; the adapter it produced stays in the store)."""
    d = find_run(runs_dir, name)
    row = run_row(d)
    if row["status"] == "running":
        raise LorakitError(f"run {name!r} is running (process {row['pid']}); stop it first")
    if confirm is not None and not confirm(d):
        return None
    shutil.rmtree(d)
    return d
