"""llama.cpp parity of lorakit's GGUF export: an adapter merged (`lorakit merge`), exported as f16 and q8_0
(`lorakit export --format gguf`), and the adapter alone as a LoRA GGUF (`--format lora-gguf`) on its base model's
GGUF, then run where users run GGUF files, in llama.cpp (llama-cpp-python), side by side with the merged model in
transformers: the same token ids in, logits and greedy continuations compared.
Run by hand; results in bench/results/gguf_parity.{md,json}.

llama-cpp-python has no CPU wheel on PyPI: it builds llama.cpp from source (about 7 minutes on 2 cores). Build the
wheel once and keep it:

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON" pip wheel --no-deps -w ~/.cache/lorakit-bench/wheels llama-cpp-python
    pip install ~/.cache/lorakit-bench/wheels/llama_cpp_python-*.whl
    python bench/gguf_parity.py --adapter quickstart      # an adapter in ./adapters (train recipes/quickstart.yaml)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import common

PROMPTS = [
    "# Keeper's Log — Gull Rock Light, Week 2\n\nDay 8. Wind:",
    "The tide at Harrow Point turns",
    "Fog came in from the west before dawn, and the keeper",
]
NEW_TOKENS = 24


def lorakit(*args: str) -> None:
    res = subprocess.run([sys.executable, "-m", "lorakit.cli", *args], capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"lorakit {' '.join(args)} failed:\n{res.stderr[-2000:]}")


def transformers_side(model_dir: Path, ids: list[list[int]], eos: int):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    logits, greedy = [], []
    with torch.no_grad():
        for row in ids:
            t = torch.tensor([row])
            logits.append(model(input_ids=t).logits[0].numpy())
            out = model.generate(input_ids=t, attention_mask=torch.ones_like(t), max_new_tokens=NEW_TOKENS,
                                 do_sample=False, pad_token_id=eos, eos_token_id=eos)  # fmt: skip
            new = out[0, len(row) :].tolist()
            greedy.append(new[: new.index(eos) + 1] if eos in new else new)
    return logits, greedy


def llama_cpp_side(gguf: Path, ids: list[list[int]], eos: int, lora: Path | None = None):
    from llama_cpp import Llama

    extra = {"lora_path": str(lora)} if lora else {}
    llm = Llama(model_path=str(gguf), n_ctx=512, logits_all=True, n_threads=2, verbose=False, **extra)
    logits, greedy = [], []
    for row in ids:
        llm.reset()
        llm.eval(row)
        logits.append(np.array(llm.scores[: len(row)], dtype=np.float32))
        seq = []
        for _ in range(NEW_TOKENS):  # greedy on llama.cpp's own logits, fed back token by token, to EOS
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            seq.append(nxt)
            if nxt == eos:
                break
            llm.eval([nxt])
        greedy.append(seq)
    return logits, greedy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", default="quickstart", help="adapter in --store to merge and export")
    p.add_argument("--store", default="adapters")
    p.add_argument("--work", type=Path, default=Path("/tmp/lorakit-gguf-parity"))
    p.add_argument("--out", type=Path, default=common.BENCH / "results")
    args = p.parse_args()
    try:
        import llama_cpp
    except ImportError:
        sys.exit("llama-cpp-python is not installed: see this script's help for building its wheel once")
    args.work.mkdir(parents=True, exist_ok=True)
    merged = args.work / "merged"
    started = time.perf_counter()
    lorakit("merge", args.adapter, "--out", str(merged), "--store", args.store, "--overwrite")
    ggufs = {}  # row -> (model GGUF, LoRA GGUF or None)
    for q in ("f16", "q8_0"):
        ggufs[q] = (args.work / f"{args.adapter}-{q}.gguf", None)
        lorakit("export", str(merged), "--format", "gguf", "--quant", q, "--out", str(ggufs[q][0]), "--overwrite")
    # the adapter alone (--format lora-gguf), applied by llama.cpp at run time to the base model's GGUF
    base = json.loads((merged / "lorakit-merge.json").read_text())["base_model"]
    for q in ("f32", "f16"):
        model, lora = args.work / f"base-{q}.gguf", args.work / f"{args.adapter}-lora-{q}.gguf"
        lorakit("export", base, "--format", "gguf", "--quant", q, "--out", str(model), "--overwrite")
        lorakit("export", args.adapter, "--format", "lora-gguf", "--quant", q, "--out", str(lora), "--overwrite",
                "--store", args.store)  # fmt: skip
        ggufs[f"base {q} + LoRA {q}"] = (model, lora)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged)
    ids = [tok(text)["input_ids"] for text in PROMPTS]
    ref_logits, ref_greedy = transformers_side(merged, ids, tok.eos_token_id)
    rows = {}
    for q, (path, lora) in ggufs.items():
        logits, greedy = llama_cpp_side(path, ids, tok.eos_token_id, lora)
        diff = max(float(np.abs(a - b).max()) for a, b in zip(logits, ref_logits, strict=True))
        scale = max(float(np.abs(b).max()) for b in ref_logits)
        top1 = np.mean([(a.argmax(-1) == b.argmax(-1)).mean() for a, b in zip(logits, ref_logits, strict=True)])
        same = sum(a == b for a, b in zip(greedy, ref_greedy, strict=True))
        prefix = [next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
                  for a, b in zip(greedy, ref_greedy, strict=True)]  # fmt: skip
        rows[q] = {"max_abs_logit_diff": diff, "relative": diff / max(scale, 1.0), "top1_agreement": float(top1),
                   "greedy_identical": same, "greedy_common_prefix": prefix,
                   "gguf_mb": round(sum(f.stat().st_size for f in (path, lora) if f) / 2**20, 1)}  # fmt: skip
    result = {"adapter": args.adapter, "llama_cpp_python": llama_cpp.__version__, "prompts": len(PROMPTS),
              "new_tokens": NEW_TOKENS, "seconds": round(time.perf_counter() - started, 1),
              "results": rows}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gguf_parity.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# GGUF export: llama.cpp against transformers",
        "",
        f"Adapter `{args.adapter}` merged by `lorakit merge` (float32), exported by `lorakit export --format gguf`, "
        f"run in llama.cpp (llama-cpp-python {llama_cpp.__version__}, CPU) and compared with the merged model in "
        f"transformers (float32) on {len(PROMPTS)} prompts, the same token ids in. Greedy: up to {NEW_TOKENS} new "
        "tokens or EOS, each side on its own logits. The `base + LoRA` rows are the adapter alone "
        "(`lorakit export ADAPTER --format lora-gguf`) applied by llama.cpp at run time (`--lora`) to the base "
        f"model's GGUF (`lorakit export {base} --format gguf`); their size is both files'.",
        "",
        "| GGUF | size MB | max logit diff | relative to the logit scale | top-1 agreement | greedy identical "
        "| greedy common prefix (tokens) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for q, r in rows.items():
        lines.append(
            f"| {q} | {r['gguf_mb']} | {r['max_abs_logit_diff']:.3e} | {r['relative']:.2e} "
            f"| {100 * r['top1_agreement']:.1f}% | {r['greedy_identical']} of {len(PROMPTS)} "
            f"| {', '.join(map(str, r['greedy_common_prefix']))} |"
        )
    (args.out / "gguf_parity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
