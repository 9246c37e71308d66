"""Learning-quality benchmark: how much of a full fine-tune's held-out loss reduction lorakit's LoRA reaches with
its default settings, and where its learning rate lands in a learning-rate sweep. Run by hand; not timed.

    python bench/quality.py              # code, prose and structured corpora (about 1.5 hours on 2 cores)
    python bench/quality.py --quick      # smoke run: small corpora, one swept learning rate (a few minutes)
    python bench/quality.py --corpora code --variants r4,r64,r64-alpha128,dropout0
    python bench/quality.py --variants code:r64,prose:dropout0

Three corpora from files that ship with installed packages, each a folder of training documents and a held-out
eval file from disjoint sources: code (Python standard-library modules), prose (the Python documentation's topics
in pydoc_data) and structured (matplotlib's Adobe Font Metrics files, eval font families held out whole).
Per corpus, on the embedded SmolLM2-135M: the base model, a full fine-tune (transformers Trainer), lorakit with
a recipe that sets only the data (`defaults`), the same recipe at each swept learning rate, and any variants.
Each run is its own process; every model is scored by the same held-out loss (lorakit.use.evaluate).

Finished runs are kept in the work folder and reused on a rerun (a changed corpus, setting or lorakit source
runs them again); `--fresh` starts over. Results: bench/results/quality.{json,md} (--quick: bench/results/quick/).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import common
from quality_run import EMBEDDED, EMBEDDED_NAME
from run import Runner, machine_info

CORPORA = ("code", "prose", "structured")
FULL_LR = 5e-5
DEFAULT_LRS = "1e-3,2e-3,5e-3,8e-3"
QUICK_LRS = "1e-3"
# Extra lorakit runs (--variants): recipe overrides on top of the data-only recipe.
VARIANTS = {
    "r4": {"lora": {"r": 4}},
    "r64": {"lora": {"r": 64}},
    "r64-alpha128": {"lora": {"r": 64, "alpha": 128}},
    "dropout0": {"lora": {"dropout": 0.0}},
    "batch2": {"train": {"batch_size": 2}},
    "batch8": {"train": {"batch_size": 8}},
    "constant": {"train": {"scheduler": "constant_with_warmup"}},
    "linear": {"train": {"scheduler": "linear"}},
    "warmup0": {"train": {"warmup_ratio": 0.0}},
    "warmup25": {"train": {"warmup_ratio": 0.25}},
}
FORMAT = 1  # bump when a run's meaning changes: cached results of another format are run again


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lorakit-quality"), help="corpora, runs and cache")
    p.add_argument("--corpora", default=",".join(CORPORA), help=f"comma-separated, of {', '.join(CORPORA)}")
    p.add_argument("--train-tokens", type=int, help="training tokens per corpus (default 24000; 3000 with --quick)")
    p.add_argument("--eval-tokens", type=int, help="held-out tokens per corpus (default 8000; 1000 with --quick)")
    p.add_argument("--min-docs", type=int, default=6, help="no document longer than budget/N tokens (default 6)")
    p.add_argument("--lrs", help=f"learning rates to sweep (default {DEFAULT_LRS}; {QUICK_LRS} with --quick)")
    p.add_argument("--no-sweep", action="store_true", help="no learning-rate sweep: base, full and defaults only")
    p.add_argument(
        "--variants",
        default="",
        help=f"extra lorakit runs, of {', '.join(VARIANTS)}; CORPUS:NAME runs one on that corpus only",
    )
    p.add_argument("--quick", action="store_true", help="small corpora and one swept learning rate: a smoke run")
    p.add_argument("--fresh", action="store_true", help="run everything again instead of reusing finished runs")
    p.add_argument("--out", type=Path, help="output folder (default bench/results, bench/results/quick)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per run (default 3600)")
    args = p.parse_args(argv)
    args.train_tokens = args.train_tokens or (3000 if args.quick else 24000)
    args.eval_tokens = args.eval_tokens or (1000 if args.quick else 8000)
    args.out = args.out or common.BENCH / "results" / ("quick" if args.quick else "")
    args.corpora = [c.strip() for c in args.corpora.split(",") if c.strip()]
    unknown = [c for c in args.corpora if c not in CORPORA]
    if unknown or not args.corpora:
        p.error(f"unknown corpus {', '.join(unknown) or '(none given)'}; known: {', '.join(CORPORA)}")
    lrs_text, args.lrs = args.lrs or (QUICK_LRS if args.quick else DEFAULT_LRS), []
    for text in filter(None, (t.strip() for t in lrs_text.split(","))):
        try:
            lr = float(text)
        except ValueError:
            p.error(f"--lrs: {text!r} is not a number")
        if not 0 < lr < 1:
            p.error(f"--lrs: {text} is not in (0, 1)")
        if lr not in [v for _, v in args.lrs]:
            args.lrs.append((text, lr))
    if args.no_sweep:
        args.lrs = []
    elif not args.lrs:
        p.error("--lrs: name at least one learning rate")
    args.variants_by_corpus = {c: [] for c in args.corpora}
    for item in filter(None, (v.strip() for v in args.variants.split(","))):
        corpus, _, name = item.rpartition(":")
        if name not in VARIANTS:
            p.error(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
        if corpus and corpus not in CORPORA:
            p.error(f"--variants {item}: unknown corpus {corpus!r}")
        for c in [corpus] if corpus else args.corpora:
            if c in args.variants_by_corpus and name not in args.variants_by_corpus[c]:
                args.variants_by_corpus[c].append(name)
    return args


# --- runs ------------------------------------------------------------------------------------------


class QualityRunner(Runner):
    """run.py's runner (a process per run, its log and spec in the work folder), with lorakit's cache set."""

    def __init__(self, workdir: Path, timeout: float):
        super().__init__(workdir, timeout)
        self.cache: Path | None = None

    def env(self, model_dir: str) -> dict:
        env = super().env(model_dir)
        if self.cache is not None:
            env["LORAKIT_CACHE"] = str(self.cache)
        return env


def lorakit_source_digest() -> str | None:
    """A digest of the lorakit package the runs import: a changed lorakit runs its runs again."""
    spec = importlib.util.find_spec("lorakit")
    if spec is None or not spec.origin:
        return None
    root = Path(spec.origin).parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def lr_slug(text: str) -> str:
    return "lr" + text.replace("+", "")


def plan_runs(args, corpus: str) -> list[dict]:
    """The runs of one corpus, in order: base, full, defaults, each swept learning rate, each variant."""
    runs = [
        {"label": "base", "slug": "base", "kind": "base"},
        {"label": "full", "slug": "full", "kind": "full", "lr": FULL_LR},
        {"label": "defaults", "slug": "defaults", "kind": "lorakit", "overrides": {}},
    ]
    for text, lr in args.lrs:
        runs.append({"label": f"lr={text}", "slug": lr_slug(text), "kind": "lorakit", "sweep": True,
                     "overrides": {"train": {"learning_rate": lr}}})  # fmt: skip
    for name in args.variants_by_corpus[corpus]:
        runs.append({"label": name, "slug": name, "kind": "lorakit", "variant": True, "overrides": VARIANTS[name]})
    for r in runs:
        r["name"] = f"{corpus}-{r['slug']}"
    return runs


def run_key(run: dict, manifest: dict, lorakit_digest: str | None) -> str:
    """What a run's result depends on: its settings, the corpus files and (for lorakit runs) lorakit's source."""
    key = {"format": FORMAT, "kind": run["kind"], "lr": run.get("lr"), "overrides": run.get("overrides"),
           "corpus": manifest["digest"], "lorakit": lorakit_digest if run["kind"] != "full" else None}  # fmt: skip
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def run_one(args, runner: QualityRunner, ctx: dict, corpus: str, run: dict) -> dict:
    manifest = ctx["corpora"][corpus]
    key = run_key(run, manifest, ctx["lorakit_digest"])
    done = args.workdir / "done" / f"{run['name']}.{key}.json"  # a quick run's results sit beside the full one's
    if done.exists():
        return {**json.loads(done.read_text())["result"], "reused": True}
    spec = {
        "kind": run["kind"],
        "name": run["name"],
        "adapter": run["name"],
        "model_dir": ctx["model_dir"],
        "train_dir": manifest["train_dir"],
        "eval_file": manifest["eval_file"],
        "store": str(args.workdir / "store"),
        "lr": run.get("lr"),
        "overrides": run.get("overrides"),
    }
    result = runner.run("quality_run.py", spec)
    if "error" not in result:
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps({"key": key, "result": result}, indent=2, default=str))
    return result


def prepare(args, runner: QualityRunner) -> dict:
    """Build the corpora (one process, lorakit's usual cache) and point the runs' cache at the embedded model."""
    corpora_dir = args.workdir / "corpora" / f"train{args.train_tokens}-eval{args.eval_tokens}-docs{args.min_docs}"
    spec = {"kind": "corpora", "name": "corpora", "corpora": args.corpora, "corpora_dir": str(corpora_dir),
            "train_tokens": args.train_tokens, "eval_tokens": args.eval_tokens, "min_docs": args.min_docs}  # fmt: skip
    built = runner.run("quality_run.py", spec)
    if "error" in built:
        sys.exit("could not build the corpora (is the embedded model cached? `lorakit models pull`)")
    # The runs use a cache in the work folder (prepared data, fingerprints); the model is linked, not copied.
    runner.cache = args.workdir / "lorakit-cache"
    link = runner.cache / "models" / EMBEDDED_NAME
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() and link.resolve() != Path(built["model_dir"]).resolve():
        link.unlink()
    if not link.exists():
        link.symlink_to(built["model_dir"], target_is_directory=True)
    return {"model_dir": built["model_dir"], "corpora": built["corpora"], "lorakit_digest": lorakit_source_digest()}


# --- results ---------------------------------------------------------------------------------------


def share(base: float | None, full: float | None, loss: float | None) -> float | None:
    """(base - loss) / (base - full) in %: the share of the full fine-tune's loss reduction reached."""
    if None in (base, full, loss) or base - full <= 0:
        return None
    return 100 * (base - loss) / (base - full)


def by_label(rows: list[dict]) -> dict[str, dict]:
    return {r["label"]: r for r in rows if "error" not in r and r.get("eval_loss") is not None}


def derive(rows: list[dict]) -> dict:
    """Shares of the full fine-tune's reduction for one corpus's rows, and its summary line."""
    ok = by_label(rows)
    base = ok.get("base", {}).get("eval_loss")
    full = ok.get("full", {}).get("eval_loss")
    for r in rows:
        r["share_pct"] = share(base, full, r.get("eval_loss")) if "error" not in r else None
    swept = [r for r in ok.values() if r.get("sweep")]
    best = min(swept, key=lambda r: r["eval_loss"]) if swept else None
    defaults = ok.get("defaults")
    summary = {"base_loss": base, "full_loss": full}
    if defaults:
        summary.update(defaults_lr=defaults.get("learning_rate"), defaults_loss=defaults["eval_loss"],
                       defaults_share_pct=defaults["share_pct"])  # fmt: skip
    if best:
        summary.update(best_lr=best.get("learning_rate"), best_label=best["label"], best_loss=best["eval_loss"],
                       best_share_pct=best["share_pct"])  # fmt: skip
    if defaults and best and base is not None and base - best["eval_loss"] > 0:
        reduction = base - defaults["eval_loss"]
        summary["defaults_vs_best_pct"] = 100 * (reduction / (base - best["eval_loss"]) - 1)
    digests = {r.get("eval_digest") for r in ok.values()}
    summary["same_eval_blocks"] = len(digests) == 1
    return summary


def lr_text(lr) -> str:
    if lr is None:
        return "-"
    if isinstance(lr, str):
        return lr
    return f"{lr:.1e}".replace("e-0", "e-")


def num(x, spec: str = ".4f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def corpus_table(rows: list[dict]) -> list[str]:
    lines = [
        "| run | learning rate | held-out loss | perplexity | share of full FT's reduction | steps | train tokens "
        "| train s | total s | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | failed ({r['error']}, log {r.get('log')}) | | | | | | | | |")
            continue
        tokens = r.get("train_tokens_seen")
        lines.append(
            f"| {r['label']} | {lr_text(r.get('learning_rate'))} | {num(r.get('eval_loss'))} "
            f"| {num(r.get('perplexity'), '.2f')} | {num(r.get('share_pct'), '.0f', '%')} | {r.get('steps') or '-'} "
            f"| {tokens if tokens else '-'} | {num(r.get('train_s'), '.0f')} | {num(r.get('wall_s'), '.0f')} "
            f"| {r.get('peak_rss_mb') or '-'} |"
        )
    return lines


def summary_table(results: dict) -> list[str]:
    lines = [
        "| corpus | base loss | full FT loss | defaults: lr | defaults: loss | defaults: share | best swept lr "
        "| its loss | its share | defaults' reduction vs the best swept |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for corpus, s in results["summary"].items():
        lines.append(
            f"| {corpus} | {num(s.get('base_loss'))} | {num(s.get('full_loss'))} | {lr_text(s.get('defaults_lr'))} "
            f"| {num(s.get('defaults_loss'))} | {num(s.get('defaults_share_pct'), '.0f', '%')} "
            f"| {lr_text(s.get('best_lr'))} | {num(s.get('best_loss'))} | {num(s.get('best_share_pct'), '.0f', '%')} "
            f"| {num(s.get('defaults_vs_best_pct'), '+.1f', '%')} |"
        )
    return lines


def corpus_note(corpus: str, m: dict) -> str:
    def names(docs: list[dict]) -> str:
        shown = [d["source"] + (" (cut)" if d["cut"] else "") for d in docs]
        return ", ".join(shown[:8]) + (f" and {len(shown) - 8} more" if len(shown) > 8 else "")

    return (
        f"- {corpus}: {m['train_tokens']} training tokens in {len(m['train_documents'])} documents "
        f"({names(m['train_documents'])}); {m['eval_tokens']} held-out tokens in {len(m['eval_documents'])} "
        f"documents ({names(m['eval_documents'])})."
    )


def markdown(results: dict) -> str:
    m, c = results["machine"], results["config"]
    versions = ", ".join(f"{k} {m['versions'][k]}" for k in ("torch", "transformers", "peft", "trl"))
    out = [
        "# lorakit learning quality",
        "",
        f"{results['date']} · {m['cpu']} · {m['cores']} cores · {versions} · lorakit {m['versions'].get('lorakit')} "
        f"(git {m.get('git_commit')}, source {results['lorakit_source']})",
        "",
        f"Model: {EMBEDDED}. Per corpus: up to {c['train_tokens']} training tokens and {c['eval_tokens']} held-out "
        f"tokens (SmolLM2 tokenizer), train and eval from disjoint files." + (" Quick run." if c["quick"] else ""),
        "",
        "Held-out loss: mean next-token loss on the corpus's eval.txt in blocks of 512 tokens "
        "(lorakit.use.evaluate, float32, the same for every run); perplexity = exp(loss). "
        "Share of full FT's reduction = (base - run) / (base - full).",
        "",
        "Runs: base = the unmodified model; full = every weight trained with transformers' Trainer (block 512, "
        f"batch 4, 1 epoch, lr {lr_text(FULL_LR)}, cosine, 5% warmup, fp32); defaults = lorakit with a recipe that "
        "sets only the data and the output name (the learning rate shown is the one its Plan recorded); "
        "lr=X = the same recipe with train.learning_rate X"
        + "".join(f"; {k} = the recipe with {json.dumps(v)}" for k, v in VARIANTS.items() if k in c["variants_run"])
        + ". Train s: the training loop; total s: the whole process (loading, data, training, evaluation); "
        "peak RSS: that process's peak resident memory.",
        "",
    ]
    load = m.get("load_average_at_start", [0])[0]
    if load > 0.5 * (m.get("cores") or 1):
        out += [f"Load average {load:.1f} on {m['cores']} cores when the benchmark started: if other processes "
                "kept running, the seconds are longer than on an idle machine.", ""]  # fmt: skip
    for corpus, rows in results["runs"].items():
        out += [f"## {corpus}", ""] + corpus_table(rows) + [""]
        if not results["summary"][corpus].get("same_eval_blocks"):
            out += ["Note: the runs of this corpus were not scored on the same eval blocks (see quality.json).", ""]
    out += ["## Summary", ""] + summary_table(results)
    out += [
        "",
        "Defaults' reduction vs the best swept: (base - defaults) / (base - best swept) - 1; negative means the "
        "defaults reduce the held-out loss less than the best learning rate of the sweep.",
        "",
        "## Corpora",
        "",
        "- code: Python standard-library sources; training documents taken in turn from the packages "
        f"{', '.join(c['code_train_packages'])}; held-out documents from single-file modules.",
        "- prose: the Python documentation's topics (pydoc_data.topics), sorted; every 4th held out.",
        "- structured: matplotlib's Adobe Font Metrics files, taken in turn from each font family; "
        f"families {', '.join(c['afm_eval_families'])} held out whole.",
        f"- A document is cut at a line boundary to at most 1/{c['min_docs']} of its budget, and where the "
        "budget ends.",
        "",
    ]
    out += [corpus_note(k, v) for k, v in results["corpora"].items()]
    return "\n".join(out) + "\n"


def collect(args, ctx: dict, runs: dict, started: float, machine: dict) -> dict:
    from quality_run import AFM_EVAL_FAMILIES, CODE_TRAIN

    summary = {corpus: derive(rows) for corpus, rows in runs.items()}
    variants_run = sorted({v for vs in args.variants_by_corpus.values() for v in vs})
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "lorakit_source": ctx["lorakit_digest"],
        "config": {
            "model": EMBEDDED,
            "model_dir": ctx["model_dir"],
            "train_tokens": args.train_tokens,
            "eval_tokens": args.eval_tokens,
            "min_docs": args.min_docs,
            "block": 512,
            "lrs": [lr for _, lr in args.lrs],
            "variants": args.variants_by_corpus,
            "variants_run": variants_run,
            "full": {"lr": FULL_LR, "batch": 4, "epochs": 1, "scheduler": "cosine", "warmup": 0.05, "seed": 42},
            "quick": args.quick,
            "workdir": str(args.workdir),
            "code_train_packages": list(CODE_TRAIN),
            "afm_eval_families": list(AFM_EVAL_FAMILIES),
        },
        "corpora": ctx["corpora"],
        "runs": runs,
        "summary": summary,
        "wall_s": round(time.time() - started, 1),
    }


def write_outputs(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "quality.md").write_text(markdown(results))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    if args.fresh:
        for sub in ("done", "specs", "logs"):
            shutil.rmtree(args.workdir / sub, ignore_errors=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
        print(f"note: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: runs will take longer")
    machine = machine_info()
    runner = QualityRunner(args.workdir, args.timeout)
    print(f"building the corpora in {args.workdir / 'corpora'} ...", flush=True)
    ctx = prepare(args, runner)
    for corpus in args.corpora:
        m = ctx["corpora"][corpus]
        print(f"  {corpus}: {m['train_tokens']} train tokens ({len(m['train_documents'])} documents), "
              f"{m['eval_tokens']} eval tokens ({len(m['eval_documents'])} documents)")  # fmt: skip
    runs: dict[str, list[dict]] = {}
    for corpus in args.corpora:
        planned = plan_runs(args, corpus)
        runs[corpus] = []
        for i, run in enumerate(planned, start=1):
            print(f"[{corpus} {i}/{len(planned)}] {run['label']} ...", flush=True)
            result = run_one(args, runner, ctx, corpus, run)
            # A lorakit row's learning_rate is the one its Plan recorded (quality_run.run_lorakit).
            row = {**result, **{k: v for k, v in run.items() if k != "slug"}}
            runs[corpus].append(row)
            if "error" not in row:
                how = "reused" if row.get("reused") else f"{row.get('wall_s', 0):.0f} s"
                print(f"  loss {row['eval_loss']:.4f}, lr {lr_text(row.get('learning_rate'))}, "
                      f"{row.get('steps') or 0} steps ({how})", flush=True)  # fmt: skip
            write_outputs(collect(args, ctx, runs, started, machine), args.out)
    results = collect(args, ctx, runs, started, machine)
    results["machine"]["load_average_at_end"] = os.getloadavg()
    write_outputs(results, args.out)
    for corpus, rows in runs.items():
        print(f"\n{corpus}\n" + "\n".join(corpus_table(rows)))
    print("\n" + "\n".join(summary_table(results)))
    print(f"\nwrote {args.out}/quality.{{json,md}} in {results['wall_s']:.0f} s; work folder {args.workdir}")
    return 1 if runner.failed else 0


if __name__ == "__main__":
    sys.exit(main())
