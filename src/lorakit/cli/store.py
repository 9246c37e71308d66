"""`lorakit adapters ...`: the adapter store."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from lorakit.cli import (
    StoreOpt,
    adapters_app,
    cache_app,
    confirmer,
    console,
    new_table,
    num,
    quiet_libraries,
    say,
    size_text,
    user_errors,
)
from lorakit.errors import LorakitError

if TYPE_CHECKING:
    from lorakit.store.metadata import AdapterMeta

# --- adapters ---------------------------------------------------------------------------------


@adapters_app.command("list")
@user_errors
def adapters_list(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    base: Annotated[str | None, typer.Option(help="Only adapters whose base model contains this text.")] = None,
    store: StoreOpt = "adapters",
):
    """List the adapters in the store."""
    from lorakit.store.adapters import list_adapters

    rows = [r for r in list_adapters(store) if base is None or base in str(r["base_model"])]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = new_table("name", "base model", "method", "r", "targets", "params", "size", "eval loss", "created")
    for r in rows:
        loss = f"{r['eval_loss']:.4f}" if isinstance(r["eval_loss"], float) else "-"
        method = r["method"] + (" (imported)" if r["imported"] else "")
        cells = [r["name"], r["base_model"], method, str(r["r"]), ",".join(r["target_modules"]),
                 num(r["trainable_params"]), size_text(r["size"]), loss, r["created"][:16]]  # fmt: skip
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
    from lorakit.store.adapters import copy_adapter

    say(f"copied {src!r} to {copy_adapter(store, src, dst, overwrite)}")


@adapters_app.command("rename")
@user_errors
def adapters_rename(
    src: Annotated[str, typer.Argument(help="Adapter to rename.")],
    dst: Annotated[str, typer.Argument(help="New name.")],
    store: StoreOpt = "adapters",
):
    """Rename an adapter (one atomic step)."""
    from lorakit.store.adapters import rename_adapter

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
    from lorakit.store.adapters import import_adapter

    quiet_libraries()
    say(f"imported {path} as {import_adapter(store, path, name, overwrite, say=say)}")


@adapters_app.command("show")
@user_errors
def adapters_show(
    name: Annotated[str, typer.Argument(help="Adapter name in the store.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print its lorakit.json (machine-readable).")] = False,
    store: StoreOpt = "adapters",
):
    """Show how an adapter was made: base model, method, targets, data mix, metrics, versions, recipe."""
    import yaml

    from lorakit.store.adapters import adapter_dir, load_meta

    meta = load_meta(store, name)
    if as_json:
        print(meta.model_dump_json(indent=2))
        return
    path = adapter_dir(store, name)
    console.rule(f"[bold]{escape(name)}")
    say(str(path))
    if meta.imported:
        say("imported adapter: no lorakit.json, so no recipe, data or metrics are recorded; " + _peft_summary(path))
        return
    console.print(_adapter_facts(meta))
    console.print(_adapter_mix(meta))
    console.rule("recipe (resolved)")
    # exclude_unset: the recipe as recorded (a combined adapter records only its base and rank)
    say(yaml.safe_dump(meta.recipe.model_dump(mode="json", exclude_unset=True), sort_keys=False).rstrip())


def _adapter_facts(meta: AdapterMeta) -> Table:
    base, metrics, plan, lora = meta.base_model, meta.metrics, meta.plan, meta.recipe.lora
    flags = [flag for flag, on in (("DoRA", lora.use_dora), ("rsLoRA", lora.use_rslora)) if on]
    ppl = metrics.eval_perplexity_after
    rows = [
        ("method", meta.method + (f" ({', '.join(flags)})" if flags else "")),
        ("base model", f"{base.reference} ({base.architecture or '?'})"),
        *([("base path", base.path)] if base.path not in (None, base.reference) else []),
        ("base weights", base.fingerprint or "not recorded"),
        ("base quantization", base.quantization or "none"),
        ("rank / alpha / dropout", f"{lora.r} / {meta.lora_alpha} / {lora.dropout}"),
        ("target modules", ", ".join(meta.target_modules)),
        ("learning rate", meta.learning_rate_text()),
        ("trainable parameters", num(meta.trainable_params)),
        ("steps / tokens", f"{metrics.steps} / {num(metrics.train_tokens_seen)}"),
        (
            "eval loss",
            f"{num(metrics.eval_loss_before)} -> {num(metrics.eval_loss_after)}"
            + (f" (perplexity {ppl:.2f})" if isinstance(ppl, float) else ""),
        ),
        ("speed", f"{metrics.tokens_per_second} tokens/s over {metrics.train_runtime_s} s"),
        ("trained on", f"{plan.device}, {plan.precision}, packing {plan.packing}"),
        ("seed / created", f"{meta.seed} / {meta.created}"),
        ("versions", ", ".join(f"{k} {v}" for k, v in meta.versions.model_dump().items() if v)),
    ]
    table = Table(show_header=False, box=None)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, escape(str(value)))
    return table


def _adapter_mix(meta: AdapterMeta) -> Table:
    table = new_table("share", "training tokens", "weight", "documents", "format", "data source")
    for s in meta.data.sources:
        table.add_row(
            f"{s.share:.1%}" if s.share is not None else "-",
            num(s.train_tokens),
            str(s.weight),
            num(s.documents),
            str(s.format),
            escape(str(s.path)),
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


@adapters_app.command("rm")
@user_errors
def adapters_rm(
    name: Annotated[str, typer.Argument(help="Adapter name in the store.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Remove without asking.")] = False,
    store: StoreOpt = "adapters",
):
    """Delete an adapter from the store (asks first unless --yes)."""
    from lorakit.store.adapters import remove_adapter

    confirm = confirmer("adapter", name, yes)
    if remove_adapter(store, name, confirm) is None:
        say("nothing removed")
        raise typer.Exit(1)
    say(f"removed adapter {name!r} from {Path(store).resolve()}")


# --- the data cache ---------------------------------------------------------------------------


@cache_app.command("list")
@user_errors
def cache_list(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False):
    """List the prepared-data entries: size, when last used, the data they were made from."""
    from lorakit.data import cache
    from lorakit.data.cache import cache_root

    found = cache.entries()
    if as_json:
        print(json.dumps([e.as_json() for e in found], indent=2))
        return
    if not found:
        say(f"no prepared data in {cache_root()}")
        return
    table = new_table("key", "size", "last used", "train tokens", "sources")
    for e in found:
        row = e.as_json()
        sources = ", ".join(e.sources) or "(unreadable: prepared again when next needed)"
        table.add_row(e.key[:12], size_text(e.bytes), row["last_used"][:16], num(e.train_tokens), sources)
    console.print(table, highlight=False)
    say(f"{len(found)} entries, {size_text(sum(e.bytes for e in found))} in {cache_root()}")


@cache_app.command("clear")
@user_errors
def cache_clear(
    older_than: Annotated[
        float | None, typer.Option(help="Only entries not used for this many days.", min=0, show_default=False)
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Remove without asking.")] = False,
):
    """Remove prepared data (all of it, or what has not been used lately). Runs prepare it again when needed."""
    import time

    from lorakit.data import cache
    from lorakit.data.cache import cache_root

    found = cache.entries()
    if older_than is not None:
        found = [e for e in found if time.time() - e.last_used > older_than * 86400]
    stale = cache.leftovers()
    if not found and not stale:
        say(f"nothing to remove in {cache_root()}")
        return
    total = size_text(sum(e.bytes for e in found))
    if found and not yes:
        if not sys.stdin.isatty():
            raise LorakitError(f"not removing {len(found)} entries: no terminal to ask for confirmation; pass --yes")
        if not typer.confirm(f"Remove {len(found)} prepared-data entries ({total}) from {cache_root()}?"):
            say("nothing removed")
            raise typer.Exit(1)
    freed = cache.remove([e.path for e in found] + stale)
    say(f"removed {len(found)} entries ({size_text(freed)}) from {cache_root()}")
