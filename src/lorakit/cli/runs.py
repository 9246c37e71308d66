"""`lorakit runs list|show|rm` and `lorakit plot`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from lorakit.cli import app, confirmer, console, new_table, say, user_errors

runs_app = typer.Typer(no_args_is_help=True, help="Past and running training runs (the runs folder).")
app.add_typer(runs_app, name="runs")
RunsOpt = Annotated[str, typer.Option("--runs-dir", help="Runs folder.", envvar="LORAKIT_RUNS")]
STYLE = {"running": "cyan", "completed": "green", "interrupted": "yellow", "failed": "red"}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _loss(x: float | None) -> str:
    return f"{x:.4f}" if x is not None else "-"


@runs_app.command("list")
@user_errors
def runs_list(as_json: Annotated[bool, typer.Option("--json")] = False, runs_dir: RunsOpt = "runs"):
    """Every run: status, steps done of total, last and best eval loss, duration, the adapter it produced."""
    from lorakit.training.history import list_runs

    rows = list_runs(runs_dir)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        say(f"no runs in {Path(runs_dir).resolve()}")
        return
    table = new_table("run", "status", "steps", "last eval", "best eval", "time", "adapter / next step")
    for r in rows:
        status = r["status"] + (f" (pid {r['pid']})" if r["pid"] else "")
        steps = f"{r['steps']}/{r['total_steps']}" if r["total_steps"] else str(r["steps"])
        after = r["adapter"] or r["resume"] or r["reason"] or ""
        table.add_row(escape(r["name"]), f"[{STYLE.get(r['status'], 'white')}]{status}[/]", steps,
                      _loss(r["last_eval_loss"]), _loss(r["best_eval_loss"]), _duration(r["seconds"]),
                      escape(after))  # fmt: skip
    console.print(table)


@runs_app.command("show")
@user_errors
def runs_show(
    name: Annotated[str, typer.Argument(help="Run name (its folder in the runs folder).")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
    runs_dir: RunsOpt = "runs",
):
    """One run in full, with the resume command of an interrupted run."""
    from lorakit.training.history import find_run, run_row

    row = run_row(find_run(runs_dir, name))
    if as_json:
        print(json.dumps(row, indent=2))
        return
    for key in ("name", "status", "pid", "reason", "steps", "total_steps", "last_eval_loss", "best_eval_loss",
                "started", "seconds", "adapter", "checkpoint", "path"):  # fmt: skip
        if row[key] is not None:
            value = _duration(row[key]) if key == "seconds" else row[key]
            say(f"{key.replace('_', ' ')}: {value}")
    if row["resume"]:
        say(f"resume with: {row['resume']}")


@runs_app.command("rm")
@user_errors
def runs_rm(
    name: Annotated[str, typer.Argument(help="Run name.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Remove without asking.")] = False,
    runs_dir: RunsOpt = "runs",
):
    """Delete a failed or abandoned run's folder (asks first; never a running run; its adapter stays)."""
    from lorakit.training.history import remove_run

    confirm = confirmer("run", name, yes)
    if remove_run(runs_dir, name, confirm) is None:
        say("nothing removed")
        raise typer.Exit(1)
    say(f"removed run {name!r} from {Path(runs_dir).resolve()}")


@app.command()
@user_errors
def plot(
    names: Annotated[list[str], typer.Argument(help="Runs (in the runs folder) or adapters (in the store).")],
    out: Annotated[Path, typer.Option("--out", help="PNG file to write.")] = Path("loss.png"),
    runs_dir: RunsOpt = "runs",
    store: Annotated[str, typer.Option("--store", help="Adapter store folder.", envvar="LORAKIT_STORE")] = "adapters",
):
    """Loss curves as a PNG: train loss (raw and smoothed), eval loss and learning rate over steps; several runs
    on one chart to compare recipes."""
    from lorakit.training.plots import metrics_of, plot_runs

    series = {n: metrics_of(n, runs_dir, store) for n in names}
    path = plot_runs(series, out)
    console.print(f"[green]wrote[/] {escape(str(path))}", highlight=False)
