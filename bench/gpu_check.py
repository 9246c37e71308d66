"""On a CUDA machine: every verb runs on the embedded model with every parameter on the GPU.

    python bench/gpu_check.py [--workdir DIR]

Trains two tiny adapters (a few steps of recipes/quickstart.yaml and recipes/tides.yaml), then loads them as
generate, chat and eval do, merges one, combines both and exports a GGUF file, checking after each load that no
parameter was left on the CPU and that the dtype is the Plan's (bf16 where the GPU has it, else fp16; float32
for merge, combine and export, which verify in float32). Exits 1 with the failing verb named.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def check(verb: str, model, want_dtype) -> None:
    import torch

    off = sorted({str(p.device) for p in model.parameters() if p.device.type != "cuda"})
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point() and not p.requires_grad}
    if off:
        sys.exit(f"{verb}: parameters on {', '.join(off)}, expected every one on the GPU")
    if want_dtype is not None and want_dtype not in dtypes:
        sys.exit(f"{verb}: frozen weights in {dtypes}, expected {want_dtype}")
    print(f"ok  {verb}: every parameter on cuda ({', '.join(str(d).removeprefix('torch.') for d in dtypes)})")
    del model
    torch.cuda.empty_cache()


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this check needs a GPU")
    half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lorakit-gpu-check-"))
    store = work / "adapters"

    import lorakit
    from lorakit.deploy.combine import load_sources
    from lorakit.deploy.gguf import export_gguf
    from lorakit.store import loader

    for name in ("quickstart", "tides"):
        result = lorakit.train(
            ROOT / "recipes" / f"{name}.yaml",
            overrides=["train.max_steps=3", f"output.store={store}", f"output.runs_dir={work / 'runs'}"],
            overwrite=True,
        )
        plan = result.meta.plan
        if not plan.device.startswith("cuda"):
            sys.exit(f"train: the Plan chose {plan.device}")
        print(f"ok  train {name}: plan device {plan.device}, precision {plan.precision}")
    for verb in ("generate", "chat", "eval"):
        check(verb, loader.load(store, ["quickstart", "tides"], verb=verb).model, half)
    check("combine", load_sources(store, ["quickstart", "tides"])[0], torch.float32)
    report = lorakit.merge("quickstart", work / "merged", store=store, overwrite=True)
    print(f"ok  merge: relative logit difference {report.relative_diff:.2e}")
    check("merge (reloaded)", loader.load(store, None, base=str(work / "merged"), verb="merge").model, None)
    gguf = export_gguf(work / "merged", work / "merged.gguf", "f16", overwrite=True)
    print(f"ok  export: GGUF logits within {gguf.relative_diff:.2e} of the source")
    print(f"all verbs ran on the GPU (work files in {work})")


if __name__ == "__main__":
    main()
