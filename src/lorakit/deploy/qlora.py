"""Merging an adapter trained on a 4-bit base: which full-precision model reproduces what was trained?

A QLoRA adapter learned to correct the 4-bit (NF4) weights it was trained on, and that model, 4-bit base + adapter,
is what `lorakit generate` and `lorakit eval` serve. A merge needs full-precision weights, and there are two:

- **dequantized**: the NF4 weights dequantized (the very numbers training computed with) plus the adapter. It
  reproduces the trained model up to rounding.
- **original**: the original full-precision base plus the adapter. The adapter never saw these weights: the merged
  model differs from the trained one by the quantization error the adapter was correcting (measured on a
  quickstart QLoRA adapter: a max logit difference of 10.7, 0 of 3 greedy continuations the same).

Both are built and measured against the trained model on the verification samples (largest logit difference,
greedy continuations that agree, perplexity); the table is printed and stored with the merged model, and the one
closer to the trained model is written unless the user picks one."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit.data.tokens import Example
from lorakit.deploy.verify import compare, forward, perplexity
from lorakit.errors import LorakitError

CHOICES = ("auto", "dequantized", "original")
PROMPT_TOKENS, NEW_TOKENS = 16, 16  # greedy agreement: each sample's first tokens as the prompt


@dataclass
class Measured:
    """One merged candidate against the trained model (4-bit base + adapter)."""

    candidate: str
    max_abs_diff: float
    relative_diff: float
    greedy_agreement: int
    greedy_total: int
    perplexity: float


@dataclass
class QloraReport:
    chosen: str
    why: str
    perplexity_trained: float
    candidates: list[Measured]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "candidates": [asdict(c) for c in self.candidates]}

    def table(self) -> list[str]:
        lines = [
            "merged model vs the model trained (4-bit base + adapter), on the verification samples:",
            f"  {'candidate':<12} {'max logit diff':>15} {'relative':>9} {'greedy same':>12} {'perplexity':>11}",
            f"  {'trained':<12} {'-':>15} {'-':>9} {'-':>12} {self.perplexity_trained:>11.4f}",
        ]
        for c in self.candidates:
            same = f"{c.greedy_agreement}/{c.greedy_total}"
            lines.append(
                f"  {c.candidate:<12} {c.max_abs_diff:>15.3e} {c.relative_diff:>9.2e} {same:>12} {c.perplexity:>11.4f}"
            )
        lines.append(f"writing the {self.chosen} merge: {self.why}")
        return lines


def greedy(model, samples: list[Example]) -> list[list[int]]:
    """Greedy continuations of each sample's first PROMPT_TOKENS tokens."""
    dev = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s.input_ids[:PROMPT_TOKENS]], device=dev)
            gen = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                min_new_tokens=NEW_TOKENS, pad_token_id=0, temperature=None, top_p=None, top_k=None,
            )  # fmt: skip
            out.append(gen[0, ids.shape[1] :].tolist())
    return out


def measure(name: str, model, samples, trained_logits, trained_greedy) -> Measured:
    diff, ppl = compare(model, samples, trained_logits)
    scale = max(float(t.abs().max()) for t in trained_logits)
    agree = sum(a == b for a, b in zip(greedy(model, samples), trained_greedy, strict=True))
    return Measured(name, diff, diff / max(scale, 1.0), agree, len(samples), ppl)


def premerge(model, samples: list[Example]):
    """A base+adapter PeftModel's logits (the merge is checked against them), what the adapter changes, and the
    merged model."""
    reference = forward(model, samples)
    with model.disable_adapter():
        effect = compare(model, samples, reference)[0]
    return reference, effect, model.merge_and_unload()


def best_merge(
    load_trained: Callable[[], Any],
    adapter_path: Path,
    samples: list[Example],
    original: Callable[[], Any],
    dtype: torch.dtype,
    choice: str,
    say=print,
):
    """Build both merges of a QLoRA adapter, measure each against the trained model (`load_trained()`: the 4-bit
    base with the adapter) and keep one. `original()` loads the original base with the adapter attached. One merged
    model is held at a time besides the 4-bit one: the original merge is measured and set aside first (rebuilt if it
    is the one kept), then the 4-bit model is dequantized in place. Returns (merged model, the logits of its
    base+adapter before merging, the adapter's effect on them, QloraReport)."""
    from peft import PeftModel

    try:
        trained = load_trained()
    except LorakitError as e:  # no working bitsandbytes here, say: the original merge, unmeasured
        why = f"the 4-bit model it was trained on cannot be loaded here ({e}); not measured against it"
        say(f"writing the original merge: {why}")
        reference, effect, merged = premerge(original(), samples)
        return merged, reference, effect, QloraReport("original", why, math.nan, [])
    trained_logits = forward(trained, samples)
    trained_greedy = greedy(trained, samples)
    report = QloraReport("", "", perplexity(trained_logits, samples), [])
    say("building both merges of this QLoRA adapter and measuring them against the model trained")

    def measured(name: str, built):
        merged = built[2].to(dtype) if dtype != torch.float32 else built[2]
        report.candidates.append(measure(name, merged, samples, trained_logits, trained_greedy))
        return built[0], built[1], merged

    measured("original", premerge(original(), samples))  # set aside: rebuilt below if it is the one kept
    base = trained.unload().dequantize(dtype=torch.float32)  # the 4-bit weights training computed with
    del trained
    kept = measured("dequantized", premerge(PeftModel.from_pretrained(base, str(adapter_path)).eval(), samples))
    del base
    closest = min(report.candidates, key=lambda c: (c.relative_diff, -c.greedy_agreement)).candidate
    if choice == "auto":
        report.chosen = closest
        report.why = "the one closer to the model trained (the default; --qlora-merge picks the other)"
    else:
        report.chosen = choice
        report.why = "as asked (--qlora-merge)" + ("" if choice == closest else f"; the {closest} one is closer")
    if report.chosen == "original":
        del kept
        kept = premerge(original(), samples)
        kept = (kept[0], kept[1], kept[2].to(dtype))
    for line in report.table():
        say(line)
    return kept[2], kept[0], kept[1], report
