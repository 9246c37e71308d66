"""Time to the first generated token, from the command line, with a cached model and an adapter.

`python bench/first_token.py [--rounds 3] [--out bench/results]`: makes an adapter for the embedded
SmolLM2-135M (random LoRA weights: the time does not depend on them), then alternates, `rounds`
times each, between
  - `lorakit generate --adapter A --temperature 0 --max-new-tokens 1 PROMPT`,
  - the plain script a user writes: transformers + peft, `PeftModel.from_pretrained`, `generate`, and
  - a script that only imports torch and transformers' Llama code (the floor for either),
timing each process from its spawn to its exit (an upper bound on the time to the first token: the
one token is the last thing it prints). Writes first-token.{md,json} to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

PROMPT = "Day 3. Wind:"
MAKE_ADAPTER = """
import sys, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
get_peft_model(model, config).save_pretrained(sys.argv[2])
"""
PLAIN = """
import sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sys.argv[1]), sys.argv[2]).eval()
ids = tok(sys.argv[3], return_tensors="pt")
with torch.no_grad():
    out = model.generate(**ids, max_new_tokens=1, do_sample=False)
print(tok.decode(out[0, ids["input_ids"].shape[1]:]))
"""
# The floor for any generation through transformers: importing what it needs for this model, nothing else.
FLOOR = """
import torch
from transformers import PreTrainedTokenizerFast
from transformers.models.llama import modeling_llama
"""


def timed(cmd: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])}... failed:\n{res.stdout}\n{res.stderr}")
    return seconds


def measure(rounds: int = 3) -> dict:
    """Spawn-to-exit seconds of each command, `rounds` alternating runs after one warm-up run."""
    from lorakit.models.embedded import pull_embedded

    model = pull_embedded()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    bin_dir = Path(sys.executable).parent
    load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="lorakit-first-token-") as tmp:
        work = Path(tmp)
        subprocess.run([sys.executable, "-c", MAKE_ADAPTER, str(model), str(work / "peft")], check=True, env=env)
        store = work / "adapters"
        imp = [str(bin_dir / "lorakit"), "adapters", "import", str(work / "peft"), "--name", "a", "--store", str(store)]
        subprocess.run(imp, check=True, env=env, capture_output=True)
        lorakit = [str(bin_dir / "lorakit"), "generate", "--adapter", "a", "--store", str(store), "--base", str(model)]
        lorakit += ["--temperature", "0", "--max-new-tokens", "1", PROMPT]
        plain = [sys.executable, "-c", PLAIN, str(model), str(work / "peft"), PROMPT]
        floor = [sys.executable, "-c", FLOOR]
        times: dict[str, list[float]] = {"lorakit generate": [], "plain transformers+peft": [], "imports only": []}
        timed(lorakit, work, env)  # warm the page cache for both: the model file is read from disk once
        for _ in range(rounds):
            times["lorakit generate"].append(timed(lorakit, work, env))
            times["plain transformers+peft"].append(timed(plain, work, env))
            times["imports only"].append(timed(floor, work, env))
    rows = {k: {"median_s": statistics.median(v), "runs_s": [round(x, 3) for x in v]} for k, v in times.items()}
    base = rows["plain transformers+peft"]["median_s"]
    for r in rows.values():
        r["x_plain"] = r["median_s"] / base
    return {"rounds": rounds, "load_average_at_start": load_at_start, "rows": rows}


def markdown(result: dict, heading: str = "#") -> list[str]:
    lines = [
        f"{heading} Time to the first generated token (from the command line)",
        "",
        f"Embedded SmolLM2-135M with an r=16 all-linear LoRA adapter, cached on disk; prompt {PROMPT!r}, one greedy",
        f"token; process spawn to exit, median of {result['rounds']} alternating runs after one warm-up run.",
        "'imports only' imports torch, transformers' fast tokenizer and its Llama modelling code, and does",
        "nothing else: the floor for any command that generates through transformers on this machine.",
        f"Load average at the start: {', '.join(f'{x:.2f}' for x in result['load_average_at_start'])}.",
        "",
        "| command | median (s) | × plain script | runs (s) |",
        "|---|---:|---:|---|",
    ]
    for name, r in result["rows"].items():
        lines.append(f"| {name} | {r['median_s']:.2f} | {r['x_plain']:.2f} | {', '.join(map(str, r['runs_s']))} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=common.BENCH / "results")
    args = ap.parse_args(argv)
    result = measure(args.rounds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "first-token.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = markdown(result)
    (args.out / "first-token.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
