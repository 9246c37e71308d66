"""lorakit benchmark: lorakit vs full fine-tuning vs a plain TRL+PEFT script, side by side.

    python bench/run.py              # full run on the embedded SmolLM2-135M (about 10 min on 2 cores)
    python bench/run.py --quick      # smoke run on a tiny random Llama (about 2 min)
    python bench/run.py --no-extras  # only the five training scenarios
    python bench/run.py --only trl-peft,lorakit --steps 3 --out /tmp/bench
    python bench/run.py --data-prep  # only data-preparation throughput (a few minutes): dataprep.{json,md}

Every scenario runs in its own process (peak RSS is per scenario). Results go to bench/results/
(bench/results/quick/ for --quick): results.json, results.md, results.png.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import common
import dataprep
import first_token
import fixtures
import peak
import report

EMBEDDED = "embedded:smollm2-135m-instruct"
# name -> (child kind, settings)
SCENARIOS = {
    "full-ft": ("full-ft", {"lr": 5e-5}),
    "trl-peft": ("trl-peft", {"lr": 2e-4}),
    "trl-peft-qlora": ("trl-peft", {"lr": 2e-4, "quantize": True}),
    "lorakit": ("lorakit", {"lr": 2e-4}),
    "lorakit-qlora": ("lorakit", {"lr": 2e-4, "quantize": True}),
}
PACKAGES = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "tokenizers", "lorakit")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, help="optimizer steps per scenario (default 12; 6 with --quick)")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of tokens/s (default 2)")
    p.add_argument("--quick", action="store_true", help="tiny random Llama, small corpus: a smoke run")
    p.add_argument("--no-extras", action="store_true", help="skip data prep and the block/model size sweeps")
    p.add_argument("--data-prep", action="store_true", help="only the data-preparation part: dataprep.{json,md}")
    p.add_argument("--only", help="comma-separated scenarios to run (default: all)")
    p.add_argument("--out", type=Path, help="output folder (default bench/results, bench/results/quick)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per scenario process")
    p.add_argument("--keep", action="store_true", help="keep the temporary work folder (models, logs)")
    args = p.parse_args(argv)
    args.steps = args.steps or (6 if args.quick else 12)
    args.out = args.out or common.BENCH / "results" / ("quick" if args.quick else "")
    names = args.only.split(",") if args.only else list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    args.scenarios = names
    return args


def machine_info() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), "?")
    mem_kb = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines() if "MemTotal" in ln)
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = "missing"
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=common.ROOT, capture_output=True, text=True)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_kb / 2**20, 1),
        "cpu_bf16": "avx512_bf16" in cpuinfo or "amx_bf16" in cpuinfo,
        "python": platform.python_version(),
        "versions": versions,
        "git_commit": git.stdout.strip() or None,
        "load_average_at_start": os.getloadavg(),
    }


class Runner:
    """Spawns child processes (one per measurement) and collects their JSON results."""

    def __init__(self, workdir: Path, timeout: float):
        self.workdir = workdir
        self.timeout = timeout
        self.failed = False

    def env(self, model_dir: str) -> dict:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        env["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
        if Path(model_dir).is_relative_to(self.workdir):  # temporary models: keep lorakit's cache out of ~
            env["LORAKIT_CACHE"] = str(self.workdir / "lorakit-cache")
        return env

    def run(self, script: str, spec: dict) -> dict:
        name = spec["name"]
        spec_path = self.workdir / "specs" / f"{name}.json"
        log_path = self.workdir / "logs" / f"{name}.log"
        spec_path.parent.mkdir(exist_ok=True)
        log_path.parent.mkdir(exist_ok=True)
        spec = {**spec, "workdir": str(self.workdir), "out": str(self.workdir / "specs" / f"{name}.result.json")}
        cmd = [sys.executable, str(common.BENCH / script), str(spec_path)]
        started = time.time()
        spec["spawn_time"] = started
        spec_path.write_text(json.dumps(spec, indent=2))
        with log_path.open("w") as log:
            try:
                proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=self.timeout,
                                      env=self.env(spec.get("model_dir", "")), cwd=self.workdir)  # fmt: skip
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        wall = time.time() - started
        out = Path(spec["out"])
        if code != 0 or not out.exists():
            self.failed = True
            tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
            print(f"  {name}: FAILED ({code}) after {wall:.0f} s; log {log_path}:\n    " + "\n    ".join(tail))
            return {"name": name, "error": f"exit {code}", "log": str(log_path)}
        result = json.loads(out.read_text())
        result["wall_s"] = round(wall, 1)
        return result


def train_spec(args, ctx: dict, name: str, kind: str, **settings) -> dict:
    spec = {
        "kind": kind,
        "name": name,
        "model_dir": ctx["model_dir"],
        "lorakit_model": ctx["lorakit_model"],
        "train_file": ctx["train_file"],
        "eval_file": ctx["eval_file"],
        "steps": args.steps,
        "warmup": args.warmup,
        "block": 256,
        "batch": 4,
        "eval_blocks": 8,
    }
    spec.update(settings)
    return spec


def run_scenarios(args, ctx: dict, runner: Runner) -> list[dict]:
    rows = []
    for i, name in enumerate(args.scenarios, start=1):
        kind, settings = SCENARIOS[name]
        print(f"[{i}/{len(args.scenarios)}] {name} ...", flush=True)
        row = runner.run("scenario.py", train_spec(args, ctx, name, kind, **settings))
        if "error" not in row:
            print(
                f"  {row['tokens_per_s']:.1f} tokens/s, peak RSS {row['peak_rss_mb']:.0f} MB, first step at "
                f"{row['time_to_first_step_s']:.1f} s, eval loss {row.get('eval_loss', float('nan')):.4f} "
                f"({row['wall_s']:.0f} s)",
                flush=True,
            )
        rows.append(row)
    return rows


def run_data_prep(args, ctx: dict, runner: Runner) -> dict:
    megabytes = 1 if args.quick else 20
    corpus = dataprep.write_corpus(runner.workdir / "corpus", megabytes)
    print(f"data preparation on a {corpus['bytes'] / 2**20:.1f} MB corpus ...", flush=True)
    runs = []
    cache_dir = str(runner.workdir / "prep-cache")
    # lorakit twice on one cache: a first run (tokenizes, stores) and a rerun (loads).
    for name, extra in (
        ("prep-plain", {"kind": "plain"}),
        ("prep-lorakit", {"kind": "lorakit", "cache_dir": cache_dir, "expect_cache": "stored"}),
        ("prep-lorakit-cached", {"kind": "lorakit", "cache_dir": cache_dir, "expect_cache": "hit"}),
    ):
        spec = {"name": name, "corpus": corpus["dir"], "corpus_bytes": corpus["bytes"],
                "model_dir": ctx["model_dir"], "block": 256, **extra}  # fmt: skip
        row = runner.run("dataprep.py", spec)
        if "error" not in row:
            ratio = runs[0]["seconds"] / row["seconds"] if runs and "error" not in runs[0] else None
            print(f"  {name}: {row['tokens_per_s']:,.0f} tokens/s, {row['seconds']:.1f} s, {row['peak_rss_mb']:.0f} MB"
                  + (f", {ratio:.1f}x prep-plain" if ratio else ""))  # fmt: skip
        runs.append(row)
    report.derive_data_prep(runs)
    return {"corpus": corpus, "runs": runs}


def sweep(args, ctx: dict, runner: Runner, points: list[tuple[str, str, str, int]], memo: dict) -> list[dict]:
    """lorakit LoRA runs of 3 steps at batch 1 (first step excluded): (label, model dir, lorakit name, block)."""
    rows = []
    for label, model_dir, lorakit_model, block in points:
        key = (model_dir, block)
        if key not in memo:
            spec = train_spec(args, ctx, f"sweep-{label}-{block}", "lorakit", lr=2e-4, block=block, batch=1, steps=3)
            spec.update(model_dir=model_dir, lorakit_model=lorakit_model, warmup=1, eval_blocks=0)
            memo[key] = runner.run("scenario.py", spec)
            r = memo[key]
            if "error" not in r:
                print(f"  {label} block {block}: {r['tokens_per_s']:.1f} tokens/s, {r['peak_rss_mb']:.0f} MB")
        rows.append({**memo[key], "model": label, "block": block})
    return rows


def run_extras(args, ctx: dict, runner: Runner) -> dict:
    extras = {"data_prep": run_data_prep(args, ctx, runner)}
    memo: dict = {}
    blocks = (64, 256) if args.quick else (128, 256, 512, 1024, 2048)
    print("block-size sweep ...", flush=True)
    points = [(ctx["label"], ctx["model_dir"], ctx["lorakit_model"], b) for b in blocks]
    note = "lorakit defaults, batch 1, 3 steps (first excluded)"
    extras["block_sizes"] = {"note": note, "runs": sweep(args, ctx, runner, points, memo)}
    print("model-size sweep ...", flush=True)
    models = runner.workdir / "models"
    sizes = [("tiny-gpt2", str(fixtures.tiny_gpt2(models / "tiny-gpt2")))]
    if not args.quick:
        sizes.append(("gpt2-small-random", str(fixtures.gpt2_small(models / "gpt2-small", ctx["model_dir"]))))
    points = [(label, path, path, 256) for label, path in sizes]
    points.append((ctx["label"], ctx["model_dir"], ctx["lorakit_model"], 256))
    note = "block 256, batch 1, 3 steps (first excluded)"
    extras["model_sizes"] = {"note": note, "runs": sweep(args, ctx, runner, points, memo)}
    if not args.quick:
        print("time to the first generated token ...", flush=True)
        extras["first_token"] = first_token.measure(rounds=3)
        rows = extras["first_token"]["rows"]
        print("  " + ", ".join(f"{k} {r['median_s']:.2f} s" for k, r in rows.items()))
    return extras


def prepare_context(args, workdir: Path) -> dict:
    """The model under test and the train/eval split every scenario reads."""
    split = common.write_split(workdir)
    ctx = {"train_file": str(workdir / "data" / "train.txt"), "eval_file": str(workdir / "data" / "eval.txt")}
    if args.quick:
        path = str(fixtures.tiny_llama(workdir / "models" / "tiny-llama"))
        ctx.update(model_dir=path, lorakit_model=path, label="tiny-llama")
    else:
        from lorakit.models.reference import resolve

        try:
            path = resolve(EMBEDDED, pull=False).path
        except Exception as e:
            sys.exit(f"{e}\n(the full benchmark needs the embedded model: run `lorakit models pull` first)")
        ctx.update(model_dir=path, lorakit_model=EMBEDDED, label="smollm2-135m")
    ctx["split"] = split
    return ctx


def write_outputs(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "results.md").write_text(report.markdown(results))
    if any("error" not in r for r in results["scenarios"]):
        report.plot(results, out / "results.png")


def data_prep_only(args, workdir: Path, runner: Runner, results: dict) -> int:
    ctx = prepare_context(args, workdir)
    results["config"] = {"model": ctx["label"], "model_dir": ctx["model_dir"], "quick": args.quick}
    results["extras"] = {"data_prep": run_data_prep(args, ctx, runner)}
    results["machine"]["load_average_at_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dataprep.json").write_text(json.dumps(results, indent=2, default=str))
    (args.out / "dataprep.md").write_text(report.data_prep_markdown(results))
    print(f"\nwrote {args.out}/dataprep.{{json,md}}")
    if runner.failed or args.keep:
        print(f"work folder kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if runner.failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="lorakit-bench-"))
    runner = Runner(workdir, args.timeout)
    if os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
        print(
            f"note: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: other jobs will slow the timings"
        )
    results = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_info()}
    if args.data_prep:
        return data_prep_only(args, workdir, runner, results)
    print("measuring the matmul peak (2048x2048, fp32 and bf16) ...", flush=True)
    results["peaks"] = peak.measure(0.5 if args.quick else 3.0)
    print(f"  fp32 {results['peaks']['fp32_gflops']:.0f} GFLOP/s, bf16 {results['peaks']['bf16_gflops']:.0f} GFLOP/s")
    ctx = prepare_context(args, workdir)
    results["config"] = {"model": ctx["label"], "model_dir": ctx["model_dir"], "steps": args.steps,
                         "warmup": args.warmup, "block": 256, "batch": 4, "eval_blocks": 8,
                         "quick": args.quick, "data": ctx["split"]}  # fmt: skip
    results["scenarios"] = run_scenarios(args, ctx, runner)
    if not args.no_extras:
        results["extras"] = run_extras(args, ctx, runner)
    report.derive(results["scenarios"], results["peaks"])
    for key in ("block_sizes", "model_sizes"):
        for row in results.get("extras", {}).get(key, {}).get("runs", []):
            if "error" not in row:
                row["mfu"] = report.mfu(row, results["peaks"])
    results["wall_s"] = round(time.time() - started, 1)
    results["machine"]["load_average_at_end"] = os.getloadavg()
    write_outputs(results, args.out)
    print("\n" + "\n".join(report.main_table(results["scenarios"])))
    print(f"\nwrote {args.out}/results.{{json,md,png}} in {results['wall_s']:.0f} s")
    if runner.failed or args.keep:
        print(f"work folder kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if runner.failed else 0


if __name__ == "__main__":
    sys.exit(main())
