"""Helpers shared by the benchmark driver (run.py) and the per-scenario child (scenario.py).

Nothing here imports torch or transformers at module level: the driver stays light, and each
child pays for its own imports (which are part of its time to first step).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import deque
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DATA = ROOT / "recipes" / "data"
EVAL_EVERY = 8  # every 8th paragraph of the shipped text is held out for the eval loss


# --- process facts ----------------------------------------------------------------------------


def vm_hwm_mb() -> float:
    """Peak resident set size of this process so far (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --- data -------------------------------------------------------------------------------------


def split_paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs: the same rule as lorakit's `split: paragraph`."""
    return [p.strip() for p in re.split(r"\n[ \t\r]*\n", text.replace("\r\n", "\n")) if p.strip()]


def shipped_paragraphs() -> list[str]:
    files = sorted((DATA / "lighthouse").glob("*.md")) + [DATA / "tides.txt"]
    return [p for f in files for p in split_paragraphs(f.read_text(encoding="utf-8"))]


def write_split(workdir: Path) -> dict:
    """Write train.txt and eval.txt (paragraphs, blank-line separated); every scenario reads these."""
    paras = shipped_paragraphs()
    held = [p for i, p in enumerate(paras) if i % EVAL_EVERY == EVAL_EVERY - 1]
    train = [p for i, p in enumerate(paras) if i % EVAL_EVERY != EVAL_EVERY - 1]
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "train.txt").write_text("\n\n".join(train) + "\n", encoding="utf-8")
    (data / "eval.txt").write_text("\n\n".join(held) + "\n", encoding="utf-8")
    return {"train_paragraphs": len(train), "eval_paragraphs": len(held), "dir": str(data)}


def read_paragraphs(path: Path | str) -> list[str]:
    return split_paragraphs(Path(path).read_text(encoding="utf-8"))


def eval_blocks(tokenizer, eval_path: Path | str, block: int, max_blocks: int) -> list[list[int]]:
    """Held-out paragraphs, each + EOS, concatenated and cut into full blocks (remainder dropped)."""
    ids: list[int] = []
    for text in read_paragraphs(eval_path):
        ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    blocks = [ids[i : i + block] for i in range(0, len(ids) - block + 1, block)]
    return blocks[:max_blocks]


def blocks_digest(blocks: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(blocks).encode()).hexdigest()[:16]


# --- model facts ------------------------------------------------------------------------------


def param_counts(model_dir: str) -> dict:
    """Total parameters and N = parameters outside the (input, position, output) embeddings.

    Counted on a meta-device copy built from the config, so 4-bit packing does not skew it.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    head = model.get_output_embeddings()
    if head is not None:
        embeddings |= {id(p) for p in head.parameters()}
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    non_emb = sum(p.numel() for k, p in unique.items() if k not in embeddings)
    return {"total": total, "non_embedding": non_emb}


def eval_loss(model, blocks: list[list[int]]) -> float:
    """Mean next-token loss over the eval blocks (all full blocks, so the mean is per token)."""
    import torch

    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    losses = []
    with torch.no_grad():
        for ids in blocks:
            x = torch.tensor([ids], device=dev)
            losses.append(float(model(input_ids=x, labels=x, use_cache=False).loss))
    model.train(was_training)
    return sum(losses) / len(losses)


# --- step timing --------------------------------------------------------------------------------


def batch_tokens(batch) -> int:
    """Non-padding tokens of a collated batch (padding-free batches have no attention mask)."""
    mask = batch.get("attention_mask")
    if mask is not None:
        return int(mask.sum())
    return int(batch["input_ids"].numel())


class CountingCollator:
    """Wraps a data collator; queues the token count of every batch it builds, in order."""

    def __init__(self, inner, counts: deque):
        self.inner = inner
        self.counts = counts

    def __call__(self, features):
        batch = self.inner(features)
        self.counts.append(batch_tokens(batch))
        return batch


def step_timer(spawn_time: float):
    """A TrainerCallback timing each optimizer step (on_step_begin -> on_step_end)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.counts: deque = deque()
            self.steps: list[dict] = []
            self.begin = 0.0
            self.first_step_end_s: float | None = None
            self.model = None
            self.hwm_after_train_mb: float | None = None
            self.hwm_last_step_mb: float | None = None

        def on_step_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            seconds = time.perf_counter() - self.begin
            # Batches are collated in order (prefetching only runs ahead), one per step here.
            tokens = self.counts.popleft() if self.counts else 0
            self.steps.append({"seconds": round(seconds, 4), "tokens": tokens})
            if len(self.steps) == 1:
                self.first_step_end_s = time.time() - spawn_time
            self.hwm_last_step_mb = vm_hwm_mb()  # before any end-of-training checkpoint is written

        def on_train_end(self, args, state, control, model=None, **kw):
            self.model = model
            self.hwm_after_train_mb = vm_hwm_mb()

    return StepTimer()


def instrument(trainer, timer) -> dict:
    """Attach the timer and the token counter to a built trainer; return its training setup."""
    if trainer.args.gradient_accumulation_steps != 1:
        raise ValueError("the benchmark counts one batch per optimizer step")
    trainer.data_collator = CountingCollator(trainer.data_collator, timer.counts)
    trainer.add_callback(timer)
    args = trainer.args
    setup = {
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "gradient_checkpointing": bool(args.gradient_checkpointing),
        "optimizer": str(getattr(args.optim, "value", args.optim)),
        "scheduler": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "learning_rate": args.learning_rate,
        "padding_free": getattr(trainer, "padding_free", None),
    }
    if hasattr(trainer.model, "get_nb_trainable_parameters"):
        setup["trainable_params"] = trainer.model.get_nb_trainable_parameters()[0]
    return setup


def steady_state(steps: list[dict], warmup: int) -> dict:
    """Tokens/s over the steps after the warm-up ones."""
    kept = steps[warmup:] or steps[-1:]
    seconds = sum(s["seconds"] for s in kept)
    tokens = sum(s["tokens"] for s in kept)
    return {
        "tokens_per_s": round(tokens / seconds, 2) if seconds else None,
        "measured_steps": len(kept),
        "mean_step_s": round(seconds / len(kept), 3) if kept else None,
        "tokens_per_step": round(tokens / len(kept), 1) if kept else None,
        "train_tokens": sum(s["tokens"] for s in steps),
    }
