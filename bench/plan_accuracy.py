"""How close `lorakit plan`'s memory estimate comes to the real peak of PyTorch tensor memory.

Each configuration trains for a few real steps with `lorakit train` (the embedded model, or a random-init Llama
built from a config) inside the PyTorch profiler with memory profiling on: the peak is the allocator's own
accounting (every allocation and free it reports, in order), not the process's RSS. Beside it, the estimate
`lorakit plan` gives for the same recipe on this machine, computed before anything is loaded. Results in
bench/results/plan_accuracy.{md,json}.

    python bench/plan_accuracy.py                  # every configuration (about 40 minutes on 2 cores)
    python bench/plan_accuracy.py --only emb-b512  # one
    python bench/plan_accuracy.py --gpu            # on a CUDA machine: torch.cuda.max_memory_allocated instead

The same file holds published GPU measurements with the planner's figure for the same configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

STEPS = 3  # optimizer steps measured: the first creates the optimizer's states, the later ones run with them
# name, model (embedded, or a Llama config), quantization, block, batch, checkpointing, chunked loss
LLAMA_350M = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 24, "num_attention_heads": 16,
              "num_key_value_heads": 4, "vocab_size": 49152}  # fmt: skip
LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 49152}  # fmt: skip
CONFIGS = [
    ("emb-b256-x1", "embedded", "none", 256, 1, "off", True),
    ("emb-b512-x4", "embedded", "none", 512, 4, "off", True),
    ("emb-b512-x4-gc", "embedded", "none", 512, 4, "on", True),
    ("emb-b512-x4-full", "embedded", "none", 512, 4, "off", False),
    ("emb-b1024-x2", "embedded", "none", 1024, 2, "off", True),
    ("emb-b2048-x1-gc", "embedded", "none", 2048, 1, "on", True),
    ("emb-b256-x8", "embedded", "none", 256, 8, "off", True),
    ("emb-4bit-b512-x4", "embedded", "4bit", 512, 4, "on", True),
    ("emb-4bit-b512-x2-nogc", "embedded", "4bit", 512, 2, "off", True),
    ("emb-8bit-b256-x2", "embedded", "8bit", 256, 2, "on", True),
    ("350m-b512-x2", LLAMA_350M, "none", 512, 2, "off", True),
    ("350m-b1024-x1-gc-full", LLAMA_350M, "none", 1024, 1, "on", False),
    ("1b-b256-x1", LLAMA_1B, "none", 256, 1, "off", True),
    ("1b-4bit-b512-x1-gc", LLAMA_1B, "4bit", 512, 1, "on", True),
]

# Published GPU measurements (HF transformers + PEFT + bitsandbytes + FlashAttention 2): the longest padded
# sequence that fit, QLoRA (4-bit) with LoRA r=32 on every linear layer, batch 1. 0: out of memory at any length.
LLAMA_31_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
               "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072,
               "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
               "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192, "rope_type": "llama3"}}  # fmt: skip
LLAMA_33_70B = {**LLAMA_31_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                "num_attention_heads": 64}  # fmt: skip
PUBLISHED = [
    {
        "source": "unsloth, Llama 3.1 (8B) max context, Hugging Face + FA2 column (unsloth.ai/blog/llama3-1)",
        "model": "Llama-3.1-8B",
        "config": LLAMA_31_8B,
        "points": [(12, 932), (16, 2551), (24, 5789)],
    },
    {
        "source": "unsloth, Llama 3.3 blog: Llama 3.1 (8B), HF + FA2 (unsloth.ai/blog/llama3-3)",
        "model": "Llama-3.1-8B",
        "config": LLAMA_31_8B,
        "points": [(8, 0), (80, 28000)],  # "out of memory for 8GB GPUs", "can only do 28,000 on a 80GB GPU"
    },
    {
        "source": "unsloth, Llama 3.3 (70B) max context, Hugging Face + FA2 column (unsloth.ai/blog/llama3-3)",
        "model": "Llama-3.3-70B",
        "config": LLAMA_33_70B,
        "points": [(48, 0), (80, 6916)],
    },
]


def synthetic_text(path: Path, tokens_wanted: int) -> None:
    """Plain paragraphs of shipped text, repeated to at least `tokens_wanted` tokens (about 4 chars a token)."""
    paras = common.shipped_paragraphs()
    random.Random(0).shuffle(paras)
    out, size = [], 0
    while size < tokens_wanted * 5:
        for p in paras:
            out.append(p)
            size += len(p)
    path.write_text("\n\n".join(out) + "\n", encoding="utf-8")


def model_dir(spec, work: Path) -> str:
    """The embedded model, or a random-init Llama with the embedded model's tokenizer (saved once, in float32: a
    checkpoint converted while it loads is converted on transformers' loading threads, whose allocations the
    profiler does not see; a bf16 checkpoint loaded in fp32 showed 268 of its 536 MiB)."""
    if spec == "embedded":
        return "embedded:smollm2-135m-instruct"
    key = "llama-fp32-" + "-".join(f"{spec[k]}" for k in sorted(spec))
    out = work / key
    if not (out / "config.json").exists():
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        from lorakit.models.reference import resolve

        tok = AutoTokenizer.from_pretrained(resolve("embedded:smollm2-135m-instruct").path)
        config = LlamaConfig(**spec, max_position_embeddings=4096, tie_word_embeddings=True,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(out)
        tok.save_pretrained(out)
    return str(out)


def recipe_for(cfg, work: Path) -> dict:
    name, spec, quant, block, batch, gc, _ = cfg
    data = work / f"text-{block * batch * STEPS}.txt"
    if not data.exists():
        synthetic_text(data, block * batch * STEPS * 2)
    return {
        "base_model": {"name": model_dir(spec, work), "quantization": quant},
        "data": {"sources": [{"path": str(data), "format": "text"}], "block_size": block, "eval_split": 0,
                 "cache": False},
        "lora": {"r": 16},
        "train": {"batch_size": batch, "max_steps": STEPS, "gradient_checkpointing": gc, "logging_every": 1,
                  "learning_rate": 1e-4},
        "output": {"name": name, "store": str(work / "adapters"), "runs_dir": str(work / "runs")},
    }  # fmt: skip


def allocator_peak(prof) -> int:
    """The peak of the CPU allocator's accounting in a profile: every allocation and free, in time order."""
    from torch._C._profiler import _EventType

    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
    current = peak = 0
    for _, size in sorted(events):
        current += size
        peak = max(peak, current)
    return peak


def one(cfg, work: Path, gpu: bool) -> dict:
    """Estimate, then train under the profiler (or CUDA's own counters) and measure; in this process."""
    import torch

    from lorakit.recipe import validate_recipe
    from lorakit.training import trainer as trainer_mod
    from lorakit.training.planner import plan_recipe
    from lorakit.training.run import train

    name, spec, quant, block, batch, gc, chunked = cfg
    recipe = validate_recipe(recipe_for(cfg, work), name)
    started = time.perf_counter()
    report = plan_recipe(recipe, data=False)
    est = report.estimate
    if not chunked:  # the model's own loss, full logits
        est.memory = report.memory_with(chunked_loss=False)
        trainer_mod.chunked_loss_parts = lambda model: None
    plan_seconds = time.perf_counter() - started
    if gpu:
        torch.cuda.reset_peak_memory_stats()
        train(recipe, overwrite=True, say=lambda *_: None)
        measured = torch.cuda.max_memory_allocated()
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            train(recipe, overwrite=True, say=lambda *_: None)
        measured = allocator_peak(prof)
    m = est.memory
    # torch.cuda.max_memory_allocated counts tensors only: the context and the allocator's slack are left out
    estimate = m.peak - (m.cuda_context + m.allocator_slack if gpu else 0)
    return {
        "name": name,
        "model": spec if spec == "embedded" else f"Llama {est.total / 1e6:.0f}M (random init)",
        "quantization": quant,
        "block": block,
        "batch": batch,
        "checkpointing": gc,
        "loss": m.loss_path,
        "estimate": estimate,
        "measured": measured,
        "error": estimate / measured - 1,
        "parts": {k: v for k, v in m.to_json().items() if isinstance(v, int)},
        "plan_seconds": round(plan_seconds, 2),
    }


def longest_context(config: dict, gib: int, work: Path, chunked: bool) -> tuple[int, int]:
    """The planner's longest block (batch 1) that fits `gib` GiB for the published setup; and its peak there."""
    from lorakit.estimate import GiB, gpu_spec
    from lorakit.recipe import validate_recipe
    from lorakit.training.planner import plan_recipe

    folder = work / f"config-{config['num_hidden_layers']}-{config['hidden_size']}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    body = {"base_model": {"name": str(folder), "quantization": "4bit"},
            "data": {"sources": [{"path": str(common.DATA / "tides.txt")}], "block_size": 1024},
            "lora": {"r": 32, "alpha": 32, "target_modules": "all-linear"},
            "train": {"batch_size": 1, "gradient_checkpointing": "on", "precision": "auto"},
            "output": {"name": "published"}}  # fmt: skip
    costed = plan_recipe(validate_recipe(body, "published"), gpu_spec(f"{gib}GB"), data=False).target
    lo, hi, best = 1, config["max_position_embeddings"], 0
    while lo <= hi:
        mid = (lo + hi) // 2
        if costed.memory_with(rows=1, length=mid, chunked_loss=chunked).peak <= gib * GiB:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best, costed


def published_rows(work: Path) -> list[dict]:
    """The planner's longest context beside each published one: with the model's own loss (full logits, as the
    published stack ran) and with lorakit's chunked loss."""
    from lorakit.estimate import ALLOCATOR_SLACK, CUDA_CONTEXT

    assumed = f"CUDA context {CUDA_CONTEXT >> 20} MiB, allocator slack {ALLOCATOR_SLACK:.0%} of a step's tensors"
    rows = []
    for pub in PUBLISHED:
        for gib, reported in pub["points"]:
            full, costed = longest_context(pub["config"], gib, work, chunked=False)
            chunked, _ = longest_context(pub["config"], gib, work, chunked=True)
            at = costed.memory_with(rows=1, length=max(reported, 1), chunked_loss=False).peak
            rows.append({"source": pub["source"], "model": pub["model"], "gpu_gib": gib, "reported": reported,
                         "planner_full_logits": full, "planner_chunked": chunked, "peak_at_reported": at,
                         "assumed": assumed})  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="comma-separated configuration names")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lorakit-plan-accuracy")
    p.add_argument("--out", type=Path, default=common.BENCH / "results")
    p.add_argument("--gpu", action="store_true", help="measure torch.cuda.max_memory_allocated on this GPU")
    p.add_argument("--merge", action="store_true", help="replace these rows in the results already in --out")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.one:  # the child: one configuration, its JSON on the last line of stdout
        cfg = next(c for c in CONFIGS if c[0] == args.one)
        print(json.dumps(one(cfg, args.work, args.gpu)))
        return
    chosen = [c for c in CONFIGS if not args.only or c[0] in args.only.split(",")]
    rows = []
    for cfg in chosen:
        print(f"[{cfg[0]}] ...", flush=True)
        cmd = [sys.executable, __file__, "--one", cfg[0], "--work", str(args.work)] + (["--gpu"] if args.gpu else [])
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if res.returncode != 0:
            print(res.stderr[-3000:])
            continue
        row = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"  estimate {row['estimate'] / 2**20:.0f} MiB, measured {row['measured'] / 2**20:.0f} MiB, "
              f"error {100 * row['error']:+.1f}%", flush=True)  # fmt: skip
    published = published_rows(args.work) if not args.only or "published" in args.only.split(",") else []
    if args.merge:  # earlier rows of other configurations, in the order of CONFIGS
        old = args.out / f"plan_accuracy{'_gpu' if args.gpu else ''}.json"
        if old.is_file():
            before = json.loads(old.read_text())
            fresh = {r["name"]: r for r in rows}
            kept = {r["name"]: r for r in before["rows"]}
            rows = [fresh.get(c[0]) or kept.get(c[0]) for c in CONFIGS if c[0] in fresh or c[0] in kept]
            published = published or before.get("published", [])
    write(rows, published, args.out, args.gpu)


def write(rows: list[dict], published: list[dict], out: Path, gpu: bool) -> None:
    errors = [abs(r["error"]) for r in rows]
    where = "CUDA (torch.cuda.max_memory_allocated)" if gpu else "CPU (the allocator's accounting, via the profiler)"
    lines = [
        "# `lorakit plan`: estimated against measured peak memory",
        "",
        f"Measured: the peak of PyTorch tensor memory over {STEPS} optimizer steps of `lorakit train` (loading "
        f"included) on {where}. Estimate: `lorakit plan`'s peak for the same recipe on the same device, from the "
        "config alone. LoRA r=16 on all linear layers, AdamW, padding-free packing.",
        "",
        "| configuration | model | quantization | block | batch | checkpointing | loss | estimate MiB | "
        "measured MiB | error |",
        "|---|---|---|---:|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['model']} | {r['quantization']} | {r['block']} | {r['batch']} | {r['checkpointing']} "
            f"| {r['loss']} | {r['estimate'] / 2**20:.0f} | {r['measured'] / 2**20:.0f} | {100 * r['error']:+.1f}% |"
        )
    if errors:
        lines += ["", f"Median |error| {100 * statistics.median(errors):.1f}%, worst {100 * max(errors):.1f}% "
                  f"({len(errors)} configurations)."]  # fmt: skip
    if published:
        lines += [
            "",
            "## Published GPU measurements beside the planner",
            "",
            "QLoRA (NF4, double quantization), LoRA r=32 on every linear layer, batch 1, sequences padded to the "
            "length, gradient checkpointing, FlashAttention 2 (flash-style attention memory), bf16. The published "
            "stack computes the model's own loss over full logits; lorakit's chunked loss is the last column. "
            "0 = out of memory at any length.",
            "",
            "| source | model | GPU GiB | longest context reported | planner, full logits | planner's peak at the "
            "reported length | planner, lorakit's chunked loss | overheads assumed |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in published:
            lines.append(
                f"| {r['source']} | {r['model']} | {r['gpu_gib']} | {r['reported']:,} | "
                f"{r['planner_full_logits']:,} | {r['peak_at_reported'] / 2**30:.2f} GiB | {r['planner_chunked']:,} "
                f"| {r['assumed']} |"
            )
    out.mkdir(parents=True, exist_ok=True)
    name = "plan_accuracy_gpu" if gpu else "plan_accuracy"
    (out / f"{name}.json").write_text(json.dumps({"rows": rows, "published": published}, indent=2) + "\n")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
