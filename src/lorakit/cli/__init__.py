"""The `lorakit` command: one thin verb per capability; errors become messages and exit codes.

This module holds what the verbs share; they live in `training` (train, recipe, models), `using`
(generate, chat, eval), `store` (adapters) and `deploy` (merge, export)."""

from __future__ import annotations

import functools
import os
import sys
import time
import warnings
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lorakit.errors import LorakitError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Recipe-driven LoRA/QLoRA fine-tuning.")
recipe_app = typer.Typer(no_args_is_help=True, help="Validate recipes and print their schema.")
models_app = typer.Typer(no_args_is_help=True, help="The embedded model cache.")
adapters_app = typer.Typer(no_args_is_help=True, help="The adapter store.")
cache_app = typer.Typer(no_args_is_help=True, help="Prepared data kept between runs (the data cache).")
app.add_typer(recipe_app, name="recipe")
app.add_typer(models_app, name="models")
app.add_typer(adapters_app, name="adapters")
app.add_typer(cache_app, name="cache")

console = Console()
err = Console(stderr=True)
EXIT_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_STOPPED = 3  # stopped on Ctrl-C/SIGTERM with a checkpoint written: resumable

StoreOpt = Annotated[str, typer.Option("--store", help="Adapter store folder.", envvar="LORAKIT_STORE")]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Run code shipped in the base model's repository. Only for models you trust; never read from a file.",
    ),
]


def quiet_libraries() -> None:
    """Keep library chatter (progress bars, notes) out of the user's terminal."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("bitsandbytes", "transformers", "peft", "trl", "datasets", "accelerate", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # datasets reads these when (and if) a command imports it: importing it here costs a generation's start-up
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
        sys.modules["datasets"].logging.set_verbosity_error()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def say(message: str) -> None:
    """Print a plain message (paths and names may hold '[...]': never read them as markup)."""
    console.print(escape(message), highlight=False)


def show_error(text: str) -> None:
    """A user's mistake, as lorakit says it: `error: ...` on stderr (the text is never read as markup)."""
    err.print(f"[bold red]error:[/] {escape(text)}", highlight=False)


def user_errors(fn):
    """Show a LorakitError as a message (exit 2), Ctrl-C as a short note (exit 130)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LorakitError as e:
            show_error(str(e))
            raise typer.Exit(EXIT_INPUT) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper


def confirmer(kind: str, name: str, yes: bool):
    """The question `rm` asks before deleting (`--yes` skips it; with no terminal to ask, nothing is deleted)."""

    def confirm(path) -> bool:
        if yes:
            return True
        if not sys.stdin.isatty():
            raise LorakitError(f"not removing {kind} {name!r}: no terminal to ask for confirmation; pass --yes")
        return typer.confirm(f"Remove {kind} {name!r} ({path})?", default=False)

    return confirm


def num(x) -> str:
    if isinstance(x, float):
        return f"{x:.4f}"
    return f"{x:,}" if isinstance(x, int) else "-" if x is None else str(x)


def new_table(*columns: str) -> Table:
    """A table whose cells wrap instead of being cut with an ellipsis on narrow terminals and pipes."""
    table = Table()
    for c in columns:
        table.add_column(c, overflow="fold")
    return table


def size_text(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def unexpected(e: Exception) -> int:
    """An exception no verb turned into a message: what the user's machine refused (disk full, permissions,
    memory) is said plainly (exit 2); anything else is lorakit's own fault, said so, with the traceback written
    to a crash log instead of the terminal (exit 1). LORAKIT_DEBUG=1 shows the traceback as well."""
    import errno
    import traceback

    from lorakit.errors import short

    if os.environ.get("LORAKIT_DEBUG"):
        traceback.print_exception(e)
    if isinstance(e, BrokenPipeError):  # `lorakit ... | head`: the reader has all it wanted
        return 0
    if isinstance(e, LorakitError):
        show_error(str(e))
        return EXIT_INPUT
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS):
        where = f" ({e.filename})" if e.filename else ""
        advice = "free some space and run it again" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "check the path"
        show_error(f"{e.strerror or e}{where}; {advice}")
        return EXIT_INPUT
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        show_error(
            "out of memory; use a smaller train.batch_size or data.block_size, base_model.quantization 4bit, "
            "or `lorakit train --dry-run` to see the plan"
        )
        return EXIT_INPUT
    from lorakit.fs import cache_dir

    log = cache_dir() / "crashes" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"lorakit {' '.join(sys.argv[1:])}\n\n" + "".join(traceback.format_exception(e)))
        saved = f"the details are in {log}"
    except OSError:
        saved = "run it again with LORAKIT_DEBUG=1 to see the details"
    err.print(
        f"[bold red]internal error:[/] {escape(type(e).__name__)}: {escape(short(e))}\n"
        f"This is a fault in lorakit, not in your input; {escape(saved)}. Please report it with that file.",
        highlight=False,
    )
    return 1


def main() -> None:
    """The `lorakit` command: run the verb, then leave without tearing the interpreter down.

    With torch and transformers imported a process holds ~2,500 modules, and Python's orderly shutdown (clearing
    each of them) took 0.9 s on this 2-core CPU, after the verb was done: a second on every `lorakit generate`.
    Once the verb has returned, its files are written and closed; output is flushed and the exit handlers run
    (logging, temporary folders, worker processes), then the process ends with the verb's exit code. The orderly
    way is kept when other threads still run or a distributed process group is up."""
    try:
        app()
        code = 0
    except SystemExit as e:
        code = e.code
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        code = EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001  (the last line of defence: a message, never a traceback)
        code = unexpected(e)
    if isinstance(code, str):  # sys.exit("message"): Python prints it and exits 1
        print(code, file=sys.stderr)
        code = 1
    code = 0 if code is None else code
    import threading

    dist = sys.modules.get("torch.distributed")
    if threading.active_count() > 1 or (dist is not None and dist.is_available() and dist.is_initialized()):
        sys.exit(code)
    from lorakit.internals import run_exit_handlers

    run_exit_handlers()
    import contextlib

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (`lorakit ... | head`): nothing to write to
            stream.flush()
    os._exit(code)


# The verbs register themselves on `app` when imported.
from lorakit.cli import training, plan, using, store, deploy, serve, runs  # noqa: E402, F401, I001  (this order in --help)
