"""`lorakit plan`: will this recipe fit, how long will it take, which tokens get trained."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from lorakit.cli import app, console, err, new_table, quiet_libraries, say, user_errors


def gib(n: int | float) -> str:
    return f"{n / 2**30:.2f} GiB"


@app.command()
@user_errors
def plan(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    gpu: Annotated[
        str | None, typer.Option(help="Plan for this GPU: a size (24GB) or a card (rtx4090, a100-80gb, t4, ...).")
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key: --set data.block_size=1024")] = None,
    fit: Annotated[
        str | None, typer.Option(help="Print the largest block_size for each batch size that fits this GPU.")
    ] = None,
    probe_steps: Annotated[
        int, typer.Option("--probe", help="Run this many real training steps here and report their speed.")
    ] = 0,
    show_tokens: Annotated[int, typer.Option(help="Show the first N training blocks, trained tokens lit.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
):
    """Will this recipe fit my GPU, how long will it take, which tokens are trained: from the model's config,
    without loading weights (and without a GPU)."""
    from lorakit.estimate import gpu_spec
    from lorakit.recipe import load_recipe

    r = load_recipe(recipe, set_ or [])
    quiet_libraries()
    from lorakit.training.planner import plan_recipe

    target = gpu_spec(gpu) if gpu else None
    fit_gpu = gpu_spec(fit) if fit else None
    if probe_steps < 0 or show_tokens < 0:
        raise typer.BadParameter("--probe and --show-tokens take a count of 0 or more")
    with console.status("planning") if not as_json else _nothing():
        report = plan_recipe(r, target)
    out = report_json(report, fit_gpu)
    if probe_steps:
        from lorakit.training.probe import probe_run

        with console.status(f"running {probe_steps} real steps") if not as_json else _nothing():
            out["probe"] = probe_run(r, probe_steps, report.target.plan.steps)
    if as_json:
        print(json.dumps(out, indent=2))
    else:
        show(report, out)
    if show_tokens:
        from lorakit.training.show_tokens import show_blocks

        show_blocks(r, show_tokens, console)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def report_json(report, fit_gpu) -> dict:
    t = report.target
    m = t.estimate.memory
    out = {
        "base_model": report.base,
        "plan": t.plan.model_dump(mode="json"),
        "parameters": {"trainable": t.estimate.trainable, "total": t.estimate.total},
        "data": report.data,
        "memory": {
            "target": report.gpu.name if report.gpu else t.plan.device,
            "traced": t.estimate.traced,
            **m.to_json(),
        },  # fmt: skip
        "notes": report.notes,
    }
    if report.gpu:
        out["fits"] = m.peak <= report.gpu.memory
        out["advice"] = report.advice(report.gpu.memory, t)
    out["verdicts"] = [
        {**v, "advice": report.advice(v["gib"] * 2**30) if not v["fits"] else []} for v in report.verdicts()
    ]
    if report.cuda is not t:
        out["verdicts_plan"] = report.cuda.plan.summary()[0]
    if fit_gpu:
        out["fit"] = {"gpu": fit_gpu.name, "rows": report.fit(fit_gpu.memory)}
    return out


def show(report, out: dict) -> None:
    t = report.target
    say(f"base model: {report.base}")
    for line in t.plan.summary():
        say(line)
    e = t.estimate
    say(f"parameters: {e.trainable:,} trainable of {e.total:,} ({100 * e.trainable / max(e.total, 1):.2f}%)")
    d = report.data
    if d:
        eff = f", packing efficiency {100 * d['packing_efficiency']:.1f}%" if d["packing_efficiency"] else ""
        say(
            f"data: {d['documents']:,} documents -> {d['examples']:,} training examples ({d['train_tokens']:,} tokens, "
            f"{d['supervised_tokens'] or 0:,} trained; {d['pieces_beyond_documents']:,} extra pieces from documents "
            f"longer than a block) -> {d['packed_blocks']:,} blocks{eff}; {d['steps_per_epoch']} steps per epoch, "
            f"{d['steps']} in all"
        )
        say("  mix: " + ", ".join(f"{m['source']} ({m['format']}) {100 * m['share']:.0f}%" for m in d["mix"]))
    for note in report.notes:
        say(f"note: {note}")
    m = e.memory
    where = report.gpu.name if report.gpu else t.plan.device
    table = new_table("memory on " + where, "GiB", "")
    rows = [
        ("weights", m.weights, f"{t.plan.quantization if t.plan.quantization != 'none' else t.plan.weights_dtype}"),
        ("LoRA weights (fp32)", m.lora, ""),
        ("gradients", m.gradients, ""),
        ("optimizer states", m.optimizer, report.recipe.train.optimizer),
        ("activations", m.activations, f"checkpointing {'on' if t.plan.gradient_checkpointing else 'off'}; "
         f"{'off' if t.plan.gradient_checkpointing else 'on'}: {gib(m.activations_other)}"),
        ("backward working set", m.working, "one layer's activation gradients"),
        ("logits and loss", m.loss, f"{m.loss_path}; {'full logits' if m.loss_path == 'chunked' else 'chunked'}: "
         f"{gib(m.loss_other)}"),
    ]  # fmt: skip
    if m.cuda_context:
        rows += [("CUDA context", m.cuda_context, "assumed"), ("allocator slack", m.allocator_slack, "assumed 10%")]
    for name, value, why in rows:
        table.add_row(name, f"{value / 2**30:.2f}", why)
    table.add_row("[bold]peak[/]", f"[bold]{m.peak / 2**30:.2f}[/]", f"during {m.peak_phase}")
    console.print(table)
    if e.traced == "parameters only":
        say("this is a parameter-only estimate: the model could not be traced for its activations")
    if report.gpu:
        verdict = "[green]fits[/]" if out["fits"] else "[red]does not fit[/]"
        console.print(f"{escape(report.gpu.name)}: {verdict} ({gib(m.peak)} of {gib(report.gpu.memory)})")
        _advice(out["advice"])
    v = new_table("GPU", "verdict", "peak")
    for row in out["verdicts"]:
        v.add_row(f"{row['gib']} GB", "[green]fits[/]" if row["fits"] else "[red]too small[/]", gib(row["peak"]))
    if "verdicts_plan" in out:
        say(f"on a GPU the Plan changes ({out['verdicts_plan'].removeprefix('plan: ')}):")
    console.print(v)
    smallest_miss = next((row for row in reversed(out["verdicts"]) if not row["fits"]), None)
    if smallest_miss and not report.gpu:
        say(f"to fit {smallest_miss['gib']} GB:")
        _advice(smallest_miss["advice"])
    if "fit" in out:
        f = new_table(f"batch on {out['fit']['gpu']}", "largest block_size", "peak")
        for row in out["fit"]["rows"]:
            f.add_row(str(row["batch"]), f"{row['block_size']:,}", gib(row["peak"]))
        console.print(f)
        if not out["fit"]["rows"]:
            err.print("[yellow]not even batch 1 at block 128 fits this GPU with these settings[/]")
    if "probe" in out:
        p = out["probe"]
        say(
            f"probe: {p['steps']} real steps on {p['device']}: {p['seconds_per_step']:.2f} s per step, "
            f"{p['tokens_per_second']:.0f} tokens/s, peak {p['peak_memory'] / 2**30:.2f} GiB ({p['peak_kind']})"
            + (f"; the whole run ({p['run_steps']} steps): about {p['eta']}" if p.get("eta") else "")
        )


def _advice(rows: list[dict]) -> None:
    for a in rows:
        mark = "[green]fits[/]" if a["fits"] else ""
        console.print(f"  - {escape(a['change'])}: {gib(a['peak'])} {mark}", highlight=False)
    if rows and not rows[-1]["fits"]:
        say("  none of these makes it fit: a GPU with more memory, or a smaller model")
