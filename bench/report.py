"""Derived numbers (ratios, MFU) and the results.md / results.png outputs."""

from __future__ import annotations

from pathlib import Path

BASELINE = "trl-peft"
MFU_FORMULA = (
    "MFU = k * N * tokens_per_s / peak, with N = base-model parameters excluding embeddings (input, position "
    "and output), k = 6 for full fine-tuning (forward 2N + backward 4N) and k = 4 for LoRA (forward 2N + "
    "input gradients 2N; the frozen base has no weight gradients; the adapter's own FLOPs and attention are "
    "not counted, nor is recomputation under gradient checkpointing); peak = the bf16 matmul GFLOP/s "
    "measured at the start of the run when the scenario trains in bf16, else the fp32 one."
)


def mfu(row: dict, peaks: dict) -> float | None:
    tps = row.get("tokens_per_s")
    if not tps or "params" not in row:
        return None
    k = 6 if row.get("mode") == "full" else 4
    peak = peaks["bf16_gflops"] if row["setup"]["precision"] == "bf16" else peaks["fp32_gflops"]
    return k * row["params"]["non_embedding"] * tps / (peak * 1e9)


def derive(rows: list[dict], peaks: dict) -> None:
    """Add ratios to the baseline, loss difference and MFU to every successful row, in place."""
    base = next((r for r in rows if r["name"] == BASELINE and "error" not in r), None)
    for row in rows:
        if "error" in row:
            continue
        row["mfu"] = mfu(row, peaks)
        if base is None:
            continue
        row["tokens_per_s_ratio"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["peak_rss_ratio"] = row["peak_rss_mb"] / base["peak_rss_mb"]
        if row.get("eval_loss") is not None and base.get("eval_loss") is not None:
            row["loss_vs_baseline_pct"] = 100 * (row["eval_loss"] - base["eval_loss"]) / base["eval_loss"]


def derive_data_prep(runs: list[dict]) -> None:
    """Speed and peak RSS of every data-prep row relative to the plain path's, in place."""
    plain = next((r for r in runs if r["name"] == "prep-plain" and "error" not in r), None)
    for row in runs:
        if plain is not None and "error" not in row:
            row["speed_x_plain"] = plain["seconds"] / row["seconds"]
            row["peak_rss_x_plain"] = row["peak_rss_mb"] / plain["peak_rss_mb"]


def _f(value, fmt: str, missing: str = "-") -> str:
    return missing if value is None else format(value, fmt)


def main_table(rows: list[dict]) -> list[str]:
    out = [
        "| scenario | tokens/s | × trl-peft | peak RSS (MB) | RSS × trl-peft | time to first step (s) "
        "| model load (s) | eval loss after | loss vs baseline | MFU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['name']} | failed: {r['error']} |" + " |" * 8)
            continue
        cells = [
            r["name"],
            _f(r["tokens_per_s"], ".1f"),
            _f(r.get("tokens_per_s_ratio"), ".2f"),
            _f(r["peak_rss_mb"], ".0f"),
            _f(r.get("peak_rss_ratio"), ".2f"),
            _f(r.get("time_to_first_step_s"), ".1f"),
            _f(r.get("model_load_s"), ".2f"),
            _f(r.get("eval_loss"), ".4f"),
            _f(r.get("loss_vs_baseline_pct"), "+.1f") + ("%" if r.get("loss_vs_baseline_pct") is not None else ""),
            _f(100 * r["mfu"], ".1f") + "%" if r.get("mfu") is not None else "-",
        ]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _ratio(row: dict | None, base: dict | None, key: str) -> float | None:
    if not row or not base or row.get(key) is None or not base.get(key):
        return None
    return row[key] / base[key]


def targets_table(results: dict) -> list[str]:
    """The performance targets, each measured against its own baseline in this run: met or not."""
    rows = {r["name"]: r for r in results["scenarios"] if "error" not in r}
    lora, qlora = rows.get("lorakit"), rows.get("lorakit-qlora")
    base, qbase = rows.get(BASELINE), rows.get("trl-peft-qlora")
    loss = _ratio(lora, base, "eval_loss")
    qloss = _ratio(qlora, qbase, "eval_loss")
    checks = [
        ("LoRA tokens/s vs trl-peft", _ratio(lora, base, "tokens_per_s"), ">=", 2.5, "×"),
        ("LoRA eval loss vs trl-peft", None if loss is None else 100 * (loss - 1), "within", 2.0, "%"),
        ("QLoRA tokens/s vs trl-peft-qlora", _ratio(qlora, qbase, "tokens_per_s"), ">=", 2.0, "×"),
        ("QLoRA peak RSS vs trl-peft-qlora", _ratio(qlora, qbase, "peak_rss_mb"), "<=", 0.5, "×"),
        ("(QLoRA eval loss vs trl-peft-qlora)", None if qloss is None else 100 * (qloss - 1), None, None, "%"),
    ]
    prep = {r["name"]: r for r in results.get("extras", {}).get("data_prep", {}).get("runs", []) if "error" not in r}
    if "prep-plain" in prep and "prep-lorakit" in prep:
        speed = prep["prep-plain"]["seconds"] / prep["prep-lorakit"]["seconds"]
        checks.append(("data preparation vs the plain script", speed, ">=", 3.0, "×"))
    first = results.get("extras", {}).get("first_token", {}).get("rows", {}).get("lorakit generate")
    if first:
        checks.append(("lorakit generate, first token (s)", first["median_s"], "<", 3.0, " s"))
    out = ["| target | measured | wanted | met |", "|---|---:|---:|---|"]
    for name, value, op, bound, unit in checks:
        if value is None:
            continue
        shown = f"{value:+.1f}{unit}" if unit == "%" else f"{value:.2f}{unit}"
        if op is None:
            out.append(f"| {name} | {shown} | - | - |")
            continue
        met = {">=": value >= bound, "<=": value <= bound, "<": value < bound, "within": abs(value) <= bound}[op]
        wanted = f"{ {'>=': '≥', '<=': '≤', 'within': '±'}.get(op, op) } {bound:g}{unit}".replace("± ", "±")
        out.append(f"| {name} | {shown} | {wanted} | {'yes' if met else '**no**'} |")
    return out


def setup_table(rows: list[dict]) -> list[str]:
    out = [
        "| scenario | precision | grad. checkpointing | padding-free packing | optimizer | scheduler | lr "
        "| LoRA dropout | trainable params | train tokens | tokens/step | eval loss of the base |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            continue
        s = r["setup"]
        cells = [
            r["name"], s["precision"], str(s["gradient_checkpointing"]), str(s.get("padding_free")),
            s["optimizer"], s["scheduler"], f"{s['learning_rate']:g}", str(s.get("lora_dropout", "-")),
            f"{s.get('trainable_params', r['params']['total']):,}", str(r["train_tokens"]),
            _f(r.get("tokens_per_step"), ".0f"), _f(r.get("eval_loss_base"), ".4f"),
        ]  # fmt: skip
        out.append("| " + " | ".join(cells) + " |")
    return out


def extras_tables(extras: dict) -> list[str]:
    out: list[str] = []
    prep = extras.get("data_prep")
    if prep:
        out += ["", f"## Data preparation ({prep['corpus']['bytes'] / 2**20:.1f} MB corpus, block 256)", ""]
        out += data_prep_table(prep["runs"])
        out += ["", DATA_PREP_NOTE]
    for key, title in (("block_sizes", "Block size (lorakit LoRA)"), ("model_sizes", "Model size (lorakit LoRA)")):
        sweep = extras.get(key)
        if not sweep:
            continue
        out += ["", f"## {title}: {sweep['note']}", ""]
        out += ["| model | block | params | tokens/s | peak RSS (MB) | MFU |", "|---|---:|---:|---:|---:|---:|"]
        for r in sweep["runs"]:
            if "error" in r:
                out.append(f"| {r['model']} | {r['block']} | failed: {r['error']} | | | |")
                continue
            out.append(
                f"| {r['model']} | {r['block']} | {r['params']['total'] / 1e6:.1f}M | {r['tokens_per_s']:.1f} | "
                f"{r['peak_rss_mb']:.0f} | {_f(100 * r['mfu'] if r.get('mfu') else None, '.1f')}% |"
            )
    if extras.get("first_token"):
        import first_token

        out += ["", *first_token.markdown(extras["first_token"], heading="##")]
    return out


DATA_PREP_NOTE = (
    "Each row is one process: read, tokenize, split, then pack as SFTTrainer does (imports and tokenizer load "
    "not timed). prep-lorakit starts from an empty lorakit cache and stores its result there; prep-lorakit-cached "
    "is the rerun that loads it. × plain: speed relative to prep-plain (its seconds / the row's seconds)."
)


def data_prep_table(runs: list[dict]) -> list[str]:
    derive_data_prep(runs)
    out = [
        "| path | tokens/s | × plain | MB/s | seconds | tokens in | tokens out (packed) | peak RSS (MB) "
        "| RSS × plain | cache | phases (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in runs:
        if "error" in r:
            out.append(f"| {r['name']} | failed: {r['error']} |" + " |" * 9)
            continue
        phases = ", ".join(f"{k} {v:.2f}" for k, v in r["phases"].items())
        out.append(
            f"| {r['name']} | {r['tokens_per_s']:,.0f} | {_f(r.get('speed_x_plain'), '.2f')} | {r['mb_per_s']:.2f} | "
            f"{r['seconds']:.2f} | {r['tokens_in']:,} | {r['tokens_out']:,} | {r['peak_rss_mb']:.0f} | "
            f"{_f(r.get('peak_rss_x_plain'), '.2f')} | {r.get('cache', '-')} | {phases} |"
        )
    return out


def data_prep_markdown(results: dict) -> str:
    """dataprep.md: the data-preparation part run on its own (`run.py --data-prep`)."""
    m, prep = results["machine"], results["extras"]["data_prep"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    lines = [
        f"# lorakit data preparation ({prep['corpus']['bytes'] / 2**20:.1f} MB corpus, block 256)",
        "",
        f"{results['date']} · {m['cpu']} · {m['cores']} cores · load average at start "
        f"{m['load_average_at_start'][0]:.1f} · tokenizer of {results['config']['model']} · {versions}",
        "",
        *data_prep_table(prep["runs"]),
        "",
        DATA_PREP_NOTE,
        "",
    ]
    return "\n".join(lines)


def markdown(results: dict) -> str:
    m, cfg, peaks = results["machine"], results["config"], results["peaks"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    lines = [
        "# lorakit benchmark",
        "",
        f"{results['date']} · {m['cpu']} · {m['cores']} cores · {versions}",
        "",
        f"Model: {cfg['model']} · block {cfg['block']} · batch {cfg['batch']} · {cfg['steps']} optimizer steps "
        f"(first {cfg['warmup']} excluded from tokens/s) · eval: {cfg['eval_blocks']} held-out blocks of "
        f"{cfg['block']} tokens, the same for every scenario, evaluated without autocast · matmul peak measured now: "
        f"fp32 {peaks['fp32_gflops']:.0f} GFLOP/s, bf16 {peaks['bf16_gflops']:.0f} GFLOP/s.",
        "",
        *main_table(results["scenarios"]),
        "",
        f"tokens/s: non-padding tokens per second over the timed steps (on_step_begin → on_step_end). {MFU_FORMULA}",
        "Time to first step: from the driver spawning the scenario's process to the end of its first step. "
        "Peak RSS: VmHWM of the scenario's process when training has returned (loading, data, training, saving), "
        "before the evaluation; results.json also holds it at the last training step (`peak_rss_last_step_mb`). "
        "Eval loss: the same held-out blocks for every scenario, in float32 without autocast; lorakit's runs "
        "are evaluated as the adapters they saved, loaded with plain PEFT on a fresh base as its baseline loads "
        "it (float32, or the QLoRA baseline's 4-bit NF4 config).",
        "",
        "## The targets (issue #4), each against its own baseline in this run",
        "",
        *targets_table(results),
        "",
        "## What each scenario ran",
        "",
        *setup_table(results["scenarios"]),
        *extras_tables(results.get("extras", {})),
        "",
    ]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["scenarios"] if "error" not in r]
    names = [r["name"] for r in rows]
    colors = ["tab:orange" if n == BASELINE else "tab:blue" for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "tokens_per_s", "training tokens/s"), (axes[1], "peak_rss_mb", "peak RSS (MB)")):
        values = [r[key] for r in rows]
        bars = ax.bar(names, values, color=colors)
        ax.bar_label(bars, fmt="%.0f")
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=25)
    fig.suptitle(
        f"{results['config']['model']}, block {results['config']['block']}, batch {results['config']['batch']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
