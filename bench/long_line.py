"""Peak memory and time of preparing one enormous line (a minified export, a one-line dump): lorakit tokenizing it in
pieces, side by side with the same preparation in one tokenizer call (the way it was done before), each in its own
process. Run by hand; results in bench/results/long_line.{md,json}.

    python bench/long_line.py            # a 50 MB file with no line break, on the embedded model's tokenizer
    python bench/long_line.py --mb 5     # smaller
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

CHILD = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, {bench!r})
import common
from lorakit.data import formats
from lorakit.data.prepare import prepare
from lorakit.models.reference import resolve
from lorakit.models.tokenizer import load_tokenizer
from lorakit.recipe import DataSection, DataSource

if {whole}:
    formats.LONG_TEXT_CHARS = 1 << 62  # the whole text in one tokenizer call
tok = load_tokenizer(resolve("embedded:smollm2-135m-instruct"))
before = common.vm_hwm_mb()
started = time.perf_counter()
section = DataSection(sources=[DataSource(path={path!r})], block_size=512, eval_split=0, cache=False)
prep = prepare(section, tok, seed=0)
print(json.dumps({{"seconds": round(time.perf_counter() - started, 1), "peak_mb": round(common.vm_hwm_mb()),
                  "before_mb": round(before), "tokens": prep.report["train_tokens"], "blocks": len(prep.train)}}))
"""


def run(path: Path, whole: bool) -> dict:
    code = CHILD.format(bench=str(common.BENCH), path=str(path), whole=whole)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=50, help="size of the one-line file in MB (default 50)")
    p.add_argument("--out", type=Path, default=common.BENCH / "results")
    args = p.parse_args()
    words = " ".join(common.shipped_paragraphs()).split()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "one-line.txt"
        target, parts, size, i = int(args.mb * 2**20), [], 0, 0
        while size < target:
            w = words[i % len(words)]
            parts.append(w)
            size += len(w) + 1
            i += 1
        path.write_text(" ".join(parts)[:target])
        rows = {}
        for name, whole in (("lorakit (pieces)", False), ("one tokenizer call", True)):
            print(f"{name} ...", flush=True)
            rows[name] = run(path, whole)
            print(f"  {rows[name]}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    from run import machine_info

    result = {"file_mb": args.mb, "machine": machine_info(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "runs": rows}  # fmt: skip
    (args.out / "long_line.json").write_text(json.dumps(result, indent=2) + "\n")
    ours, whole = rows["lorakit (pieces)"], rows["one tokenizer call"]
    lines = [
        "# Preparing one enormous line",
        "",
        f"A {args.mb:g} MB text file with no line break (words of the shipped text), `split: file`, block 512, "
        "the embedded model's tokenizer, each way in its own process. Peak: the process's peak resident memory; "
        "above start: minus what the process held once the libraries and the tokenizer were loaded.",
        "",
        "| way | seconds | peak MB | above start MB | tokens | blocks |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | | |")
        else:
            above = r["peak_mb"] - r["before_mb"]
            lines.append(f"| {name} | {r['seconds']} | {r['peak_mb']} | {above} | {r['tokens']:,} | {r['blocks']:,} |")
    if "error" not in ours and "error" not in whole:
        ratio = (ours["peak_mb"] - ours["before_mb"]) / max(whole["peak_mb"] - whole["before_mb"], 1)
        lines += ["", f"Memory above start, pieces / one call: {ratio:.2f}x; time: "
                      f"{ours['seconds'] / max(whole['seconds'], 1e-9):.2f}x; same tokens: "
                      f"{ours['tokens'] == whole['tokens']}."]  # fmt: skip
    (args.out / "long_line.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
