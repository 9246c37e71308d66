"""The adapter store: one folder per adapter, in plain PEFT format plus `lorakit.json`.

Writes are atomic: an adapter is assembled in a hidden temporary folder in the store and
renamed into place, so a failed or interrupted save never leaves a half-written adapter and
never damages the previous adapter of that name."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError, short
from lorakit.fs import dir_size, staged_dir
from lorakit.recipe import check_name
from lorakit.store.card import model_card
from lorakit.store.fit import read_peft_config
from lorakit.store.metadata import (
    META_FILE,
    REQUIRED,
    AdapterMeta,
    UnreadableMeta,
    check_consistent,
    now,
    peft_meta,
    read_meta,
    write_meta,
)


def adapter_dir(store: str | Path, name: str) -> Path:
    """The folder of adapter `name`, guaranteed to lie directly inside the store."""
    try:
        check_name(name)
    except ValueError as e:
        raise LorakitError(str(e)) from None
    root = Path(store).resolve()
    path = root / name
    if path.is_symlink() or path.resolve().parent != root:
        raise LorakitError(f"adapter {name!r} resolves outside the store {root}; refusing to use it")
    return path


def exists(store: str | Path, name: str) -> bool:
    return (adapter_dir(store, name) / META_FILE).exists() or (adapter_dir(store, name) / REQUIRED[0]).exists()


def save_adapter(
    model,
    store: str | Path,
    name: str,
    meta: AdapterMeta,
    overwrite: bool = False,
    state_dict=None,
    run_log: Path | None = None,
) -> Path:
    """Write `model` (a PeftModel) as adapter `name`; replace an existing one only with `overwrite`.

    `state_dict`: the model's weights gathered from several processes (FSDP, DeepSpeed), if they are sharded;
    `run_log`: the run's metrics.jsonl, kept with the adapter and drawn as its loss curve in the model card.
    """
    final = adapter_dir(store, name)
    if exists(store, name) and not overwrite:
        raise LorakitError(f"adapter {name!r} already exists in {final.parent}; use --overwrite to replace it")
    try:
        with staged_dir(final) as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
            portable_config(tmp, meta)
            (tmp / META_FILE).write_text(meta.to_json())
            curve = _loss_curve(name, run_log, tmp)
            (tmp / "README.md").write_text(model_card(name, meta, curve))
    except OSError as e:
        raise LorakitError(f"could not write adapter {name!r} to {final.parent}: {e.strerror or e}") from None
    return final


def _loss_curve(name: str, run_log: Path | None, folder: Path) -> str | None:
    """The run's log and its loss curve in the adapter's folder; the curve's file name (None without a log)."""
    import shutil

    from lorakit.training.history import metrics_rows
    from lorakit.training.plots import CURVE_FILE, METRICS_COPY, plot_runs

    if run_log is None or not Path(run_log).is_file():
        return None
    shutil.copyfile(run_log, folder / METRICS_COPY)
    rows = metrics_rows(folder)
    if not any("loss" in r for r in rows):
        return None
    plot_runs({name: rows}, folder / CURVE_FILE)
    return CURVE_FILE


def portable_config(folder: Path, meta: AdapterMeta) -> None:
    """adapter_config.json names the base as other machines find it (PEFT writes the path it was loaded from:
    here, a folder in this machine's cache)."""
    if not meta.base_model.portable_id:
        return
    path = folder / REQUIRED[0]
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = meta.base_model.portable_id
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_meta(store: str | Path, name: str) -> AdapterMeta:
    """Adapter `name`'s lorakit.json, checked against its adapter_config.json."""
    path = adapter_dir(store, name)
    if not path.is_dir():
        known = ", ".join(a["name"] for a in list_adapters(store)) or "none"
        raise LorakitError(f"no adapter {name!r} in {Path(store).resolve()} (adapters: {known})")
    missing = [f for f in REQUIRED if not (path / f).is_file()]
    if missing:
        raise LorakitError(f"adapter {name!r} is incomplete: missing {', '.join(missing)}")
    meta = read_meta(path)
    check_consistent(path, meta)
    return meta


def list_adapters(store: str | Path) -> list[dict[str, Any]]:
    root = Path(store)
    if not root.is_dir():
        return []
    return [
        _row(d)
        for d in sorted(root.iterdir())
        if not d.name.startswith(".") and d.is_dir() and all((d / f).is_file() for f in REQUIRED)
    ]


def _row(d: Path) -> dict[str, Any]:
    """One adapter of `adapters list`. One whose lorakit.json cannot be read is still listed, with what its
    adapter_config.json says and the reason as its method, so one damaged adapter never hides the others."""
    meta, problem = None, None
    if (d / META_FILE).is_file():
        try:
            meta = read_meta(d)
        except UnreadableMeta as e:
            problem = e.why
        except (LorakitError, OSError) as e:
            problem = str(e)
    if meta is None:
        meta = _from_peft_config(d)
    if problem:
        meta = meta.model_copy(update={"method": f"unreadable: {problem}", "imported": False})
    return {
        "name": d.name,
        "base_model": meta.base_model.reference or "?",
        "method": meta.method,
        "r": meta.recipe.lora.r,
        "target_modules": sorted(meta.target_modules),
        "trainable_params": meta.trainable_params,
        "size": dir_size(d),
        "created": meta.created,
        "eval_loss": meta.metrics.eval_loss_after,
        "imported": meta.imported,
        "problem": problem,
    }


def _from_peft_config(d: Path) -> AdapterMeta:
    """What an adapter's adapter_config.json alone says (nothing, if it is unreadable too)."""
    try:
        return peft_meta(d.name, read_peft_config(d))
    except LorakitError:
        return AdapterMeta(name=d.name, imported=True)


def _place(src: Path, store: str | Path, name: str, overwrite: bool, meta: AdapterMeta | None) -> Path:
    """Copy an adapter folder into the store as `name`, atomically; rewrite its lorakit.json."""
    final = adapter_dir(store, name)
    if exists(store, name) and not overwrite:
        raise LorakitError(f"adapter {name!r} already exists in {final.parent}; use --overwrite to replace it")
    try:
        with staged_dir(final) as tmp:
            shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(".*"), dirs_exist_ok=True)
            if meta is not None:
                write_meta(tmp, meta)
                (tmp / "README.md").write_text(model_card(name, meta))
    except OSError as e:
        raise LorakitError(f"could not write adapter {name!r} to {final.parent}: {e.strerror or e}") from None
    return final


def copy_adapter(store: str | Path, src: str, dst: str, overwrite: bool = False) -> Path:
    meta = load_meta(store, src)
    return _place(
        adapter_dir(store, src), store, dst, overwrite, meta.model_copy(update={"name": dst, "copied_from": src})
    )


def rename_adapter(store: str | Path, src: str, dst: str) -> Path:
    meta = load_meta(store, src)
    target = adapter_dir(store, dst)
    if target.exists():
        raise LorakitError(f"adapter {dst!r} already exists in {target.parent}; remove it first")
    write_meta(adapter_dir(store, src), meta.model_copy(update={"name": dst}))
    adapter_dir(store, src).rename(target)  # one atomic step within the store
    return target


def import_adapter(store: str | Path, path: Path, name: str | None = None, overwrite: bool = False, say=print) -> Path:
    """Register a PEFT LoRA adapter made elsewhere, with what its adapter_config.json says, once its tensors are
    checked against the base model it names (built on the meta device from its config: no weights are read)."""
    path = Path(path)
    if not (path / REQUIRED[0]).is_file():
        raise LorakitError(f"{path}: not a PEFT adapter folder (no adapter_config.json)")
    if not (path / REQUIRED[1]).is_file():
        hint = " (only adapter_model.bin: load it in PEFT and save again as safetensors)"
        raise LorakitError(
            f"{path}: no adapter_model.safetensors{hint if (path / 'adapter_model.bin').exists() else ''}"
        )
    config = read_peft_config(path)
    if config.get("peft_type") not in (None, "LORA"):
        raise LorakitError(f"{path}: a {config.get('peft_type')} adapter; lorakit handles LoRA adapters")
    name = name or path.resolve().name
    adapter_dir(store, name)  # a valid name, before any checking
    meta = peft_meta(name, config, str(path.resolve()), created=now())
    check_against_base(path, name, config.get("base_model_name_or_path"), say)
    return _place(path, store, name, overwrite, meta)


def check_against_base(path: Path, name: str, base: str | None, say) -> None:
    """Check an adapter folder's tensors against the skeleton of `base`; say so when the base cannot be read here."""
    from lorakit.store.fit import check_fits, tensor_shapes

    tensor_shapes(path, name)  # a damaged weights file is refused whatever happens next
    if not base:
        say(f"{name}: its adapter_config.json names no base model; its tensors are checked when it is loaded")
        return
    from lorakit.models.architecture import skeleton
    from lorakit.models.reference import resolve

    try:  # best effort: nothing is downloaded or pulled for it, and model code is not run
        ref = resolve(base, pull=False)
        if ref.kind == "hub":  # its config from the local hub cache, or no check (no network for an import)
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(ref.path, "config.json", revision=ref.revision)
            if not isinstance(cached, str):
                raise LorakitError("its config is not in the local hub cache")
            ref = resolve(str(Path(cached).parent))
        model = skeleton(ref)
    except Exception as e:  # noqa: BLE001  (an unreachable hub, a config transformers cannot build)
        say(f"{name}: not checked against its base {base} here ({short(e)}); it is checked when it is loaded")
        return
    check_fits(model, path, name, base)
    say(f"{name}: every tensor fits a module of {base}")


def remove_adapter(store: str | Path, name: str, confirm: Callable[[Path], bool] | None = None) -> Path | None:
    """Delete adapter `name` (after `confirm(path)` agrees, if given); None if not confirmed.

    The folder is renamed to a hidden one first, so the adapter leaves the store in one step.
    """
    path = adapter_dir(store, name)
    if not path.is_dir() or not exists(store, name):
        known = ", ".join(a["name"] for a in list_adapters(store)) or "none"
        raise LorakitError(f"no adapter {name!r} in {Path(store).resolve()} (adapters: {known})")
    if confirm is not None and not confirm(path):
        return None
    trash = path.parent / f".rm-{name}-{uuid.uuid4().hex[:8]}"
    try:
        path.rename(trash)
    except OSError as e:
        raise LorakitError(f"could not remove adapter {name!r} from {path.parent}: {e.strerror or e}") from None
    # A failure here leaves only a hidden folder, which listing and loading ignore.
    shutil.rmtree(trash, ignore_errors=True)
    return path
