"""`lorakit merge` and `lorakit export`: from adapters to deployable models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from lorakit.cli import (
    StoreOpt,
    TrustOpt,
    app,
    console,
    quiet_libraries,
    say,
    size_text,
    user_errors,
)
from lorakit.errors import LorakitError
from lorakit.fs import dir_size

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
    qlora_merge: Annotated[
        str,
        typer.Option(
            help="An adapter trained on a 4-bit base: merge into the dequantized 4-bit weights it was trained on, "
            "the original weights, or auto: whichever of the two is closer to the model trained (both are measured)."
        ),
    ] = "auto",
    trust_remote_code: TrustOpt = False,
    store: StoreOpt = "adapters",
):
    """Merge an adapter into its base (verified), or combine several adapters into one.

    One adapter with --out: a full-precision model folder, checked against base+adapter before it is kept.
    Several adapters: a new adapter (--into-adapter NAME) or a merged model (--out DIR), with peft's
    add_weighted_adapter (--method, --weights, --density)."""
    names, weight_list = split_weights(names, weights)
    if len(names) == 1 and weight_list is None and into_adapter is None:
        if out is None:
            raise LorakitError("say where the merged model goes: --out DIR")
        quiet_libraries()
        from lorakit.deploy.merge import merge_adapter

        with console.status(f"merging {escape(names[0])}"):
            report = merge_adapter(
                store, names[0], out, dtype=dtype, tolerance=tolerance, overwrite=overwrite, base=base, say=say,
                trust_remote_code=trust_remote_code, qlora_merge=qlora_merge,
            )  # fmt: skip
        _merged_message(report)
        return
    if out is None and into_adapter is None:
        raise LorakitError("combining adapters writes a new adapter (--into-adapter NAME) or a model (--out DIR)")
    from lorakit.deploy import combine

    weight_list = combine.check_request(names, weight_list, method, density)
    quiet_libraries()
    opts = dict(weights=weight_list, method=method, density=density, svd_rank=svd_rank, seed=seed,
                trust_remote_code=trust_remote_code)  # fmt: skip
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
    size = dir_size(report.out)
    console.print(
        f"[green]wrote merged model[/] {escape(str(report.out))} ({size_text(size)}, {report.seconds:.1f} s); "
        "it loads with transformers' AutoModelForCausalLM.from_pretrained, no peft needed",
        highlight=False,
    )


# --- export -----------------------------------------------------------------------------------


@app.command()
@user_errors
def export(
    source: Annotated[
        str,
        typer.Argument(
            help="A merged model folder, embedded:NAME, or an adapter name (merged first, or as a LoRA GGUF)."
        ),
    ],
    format_: Annotated[
        str,
        typer.Option(
            "--format",
            help="hf (model folder), gguf (one file), ollama, or lora-gguf (the adapter alone, for llama.cpp --lora).",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder (hf, ollama) or .gguf file (gguf, lora-gguf) to write.")],
    quant: Annotated[str, typer.Option(help="GGUF weight type: f32, f16 or q8_0 (lora-gguf: f32 or f16).")] = "f16",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
    trust_remote_code: TrustOpt = False,
    store: StoreOpt = "adapters",
):
    """Export a merged model (or an adapter, merged first) as a model folder, a GGUF file, or for Ollama."""
    quiet_libraries()
    from lorakit.deploy.export import export_model

    with console.status(f"exporting {escape(source)}"):
        path = export_model(
            source, format_, out, quant, overwrite=overwrite, store=store, say=say, trust_remote_code=trust_remote_code
        )
    console.print(f"[green]wrote[/] {escape(str(path))} ({format_})", highlight=False)
    if format_ == "ollama":
        say(f"create the Ollama model with: cd {path} && ollama create NAME -f Modelfile")
