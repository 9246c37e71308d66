"""`lorakit export`: a merged model (or an adapter, merged first) as a model folder, a GGUF file or for Ollama."""

from __future__ import annotations

from pathlib import Path

from lorakit.deploy.gguf import export_gguf
from lorakit.deploy.ollama import stop_tokens, write_modelfile
from lorakit.errors import LorakitError
from lorakit.fs import remove_leftovers, staged_dir

FORMATS = ("hf", "gguf", "ollama", "lora-gguf")


def prompt_style(model_dir: Path, tokenizer) -> str:
    """How a merged model was trained to be prompted: as its merge recorded it (from the adapter), else chat for
    a model with a chat template and raw text for one without."""
    import json

    from lorakit.deploy.merge import MERGE_FILE

    try:
        recorded = json.loads((Path(model_dir) / MERGE_FILE).read_text()).get("prompt_style")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded in ("raw", "alpaca", "chat"):
        return recorded
    return "chat" if tokenizer.chat_template else "raw"


def export_model(
    source: str,
    fmt: str,
    out: Path,
    qtype: str = "f16",
    overwrite: bool = False,
    store="adapters",
    say=print,
    trust_remote_code: bool = False,
) -> Path:
    """Export a merged model folder (or the embedded model), or an adapter: merged first, or as a LoRA GGUF
    (`source` names one in the store)."""
    import shutil
    import tempfile

    from lorakit.deploy.merge import check_out, merge_adapter

    if fmt not in FORMATS:
        raise LorakitError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out).expanduser().resolve()
    if source.startswith("embedded:"):  # the embedded model itself, e.g. as the base GGUF for a LoRA GGUF
        from lorakit.models.reference import resolve

        source = resolve(source).path
    model_dir = Path(source).expanduser()
    is_dir = (model_dir / "config.json").is_file()
    if not is_dir and ("/" in source or model_dir.exists()):
        raise LorakitError(f"{source} is not a model directory (no config.json in it)")
    if fmt == "hf":
        if is_dir:
            out = check_out(out, overwrite, keep=[model_dir])
            try:
                with staged_dir(out) as tmp:  # the old folder stays until the copy is complete
                    shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
            except OSError as e:
                raise LorakitError(f"could not write {out}: {e.strerror or e}; nothing written") from None
        else:
            merge_adapter(store, source, out, overwrite=overwrite, say=say, trust_remote_code=trust_remote_code)
        return out
    if fmt == "lora-gguf":
        if is_dir:
            raise LorakitError(f"--format lora-gguf exports an adapter; {source} is a model folder (merged already)")
        return export_adapter_gguf(store, source, out, qtype, overwrite, say, trust_remote_code)
    name = model_dir.resolve().name if is_dir else source
    if fmt == "ollama":
        check_out(out, overwrite, keep=[model_dir] if is_dir else [])
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".tmp-{out.name}-merge-") as tmp:
        if not is_dir:
            say(f"merging adapter {source!r} first")
            merged = merge_adapter(store, source, Path(tmp) / "merged", say=say, trust_remote_code=trust_remote_code)
            model_dir = merged.out
        if fmt == "gguf":
            export_gguf(model_dir, out, qtype, overwrite=overwrite, say=say)  # one file, renamed into place
            return out
        from transformers import AutoTokenizer

        with staged_dir(out) as folder:  # the GGUF file and its Modelfile, in place together
            report = export_gguf(model_dir, folder / f"{name}.gguf", qtype, say=say)
            tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
            style = prompt_style(model_dir, tok)
            _, described = write_modelfile(report.out, tok.chat_template, stop_tokens(tok), style)
            say(f"Ollama template: {described}")
    return out


def export_adapter_gguf(
    store, name: str, out: Path, qtype: str, overwrite: bool, say=print, trust_remote_code: bool = False
) -> Path:
    """The adapter as a LoRA GGUF for llama.cpp, and how to run it there."""
    from transformers import AutoConfig

    from lorakit.deploy.lora_gguf import export_lora_gguf
    from lorakit.deploy.merge import base_section
    from lorakit.models.reference import resolve
    from lorakit.store import adapters, loader

    meta = adapters.load_meta(store, name)
    path = adapters.adapter_dir(store, name)
    section = loader.remote_code(base_section(meta, path, "float32", None), [name], None, trust_remote_code)
    ref = resolve(section.name, section.revision)
    try:
        config = AutoConfig.from_pretrained(ref.path, trust_remote_code=section.trust_remote_code, **ref.load_args)
    except (OSError, ValueError) as e:
        raise LorakitError(f"could not read the base model's config ({section.name}): {e}") from None
    report = export_lora_gguf(path, config, out, qtype, overwrite, name, say)
    say(f"{report.pairs} adapted weights, alpha {report.alpha:g}, {report.size / 1e6:.1f} MB")
    base_hint = "BASE.gguf" if ref.kind != "gguf" else str(Path(ref.path) / ref.gguf_file)
    say(f"run it with llama.cpp on its base model: llama-cli -m {base_hint} --lora {report.out}")
    if ref.kind != "gguf":
        say(
            f"the base as GGUF: lorakit export {section.name} --format gguf --quant f32 --out BASE.gguf"
            + (" (the weights the adapter was trained on)" if ref.kind == "embedded" else "")
        )
    if meta.recipe.base_model is not None and meta.recipe.base_model.quantization != "none":
        say(
            f"note: the adapter was trained on a {meta.recipe.base_model.quantization} base; llama.cpp applies it "
            "to whatever weights BASE.gguf holds"
        )
    return report.out
