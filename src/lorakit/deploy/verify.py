"""Checking a deployed model against its source: sample texts, their logits, the largest difference, perplexity."""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch

from lorakit.data.content import content_hash
from lorakit.data.formats import format_records
from lorakit.data.sources import read_records
from lorakit.data.split import MIN_DOCS_FOR_DOC_SPLIT, split_eval
from lorakit.data.tokens import IGNORE, Example
from lorakit.errors import LorakitError
from lorakit.recipe import DataSection
from lorakit.store.metadata import AdapterMeta

SAMPLE_DOCS = 4
SAMPLE_TOKENS = 128
BUILTIN_TEXT = (
    "The keeper climbed the stairs of the lighthouse at dusk, trimmed the wick and wound the clockwork "
    "that turned the lens. Out on the water the tide was turning, and the fishing boats came home one by "
    "one, guided by the beam that swept across the harbour every ten seconds."
)


def verification_samples(meta: AdapterMeta, tokenizer) -> tuple[list[Example], str]:
    """A few documents of the adapter's own data (held-out ones first), else a fixed text; and what they are."""
    try:
        # Validated here, not when lorakit.json is read: the data may have moved or changed since training.
        section = DataSection.model_validate(meta.recipe.data)  # None (imported, combined): a ValueError
        held = _recorded_held_out(meta, section)
        records, n_held, source = _sample_records(section, held, 42 if meta.seed is None else meta.seed)
        examples = format_records(tokenizer, records, section.sources[0].format)
    except (KeyError, ValueError, OSError, LorakitError):  # no recipe, or its data has moved or changed
        examples, n_held, source = [], 0, ""
    samples = [Example(e.input_ids[:SAMPLE_TOKENS], e.labels[:SAMPLE_TOKENS]) for e in examples]
    if not samples:
        ids = tokenizer(BUILTIN_TEXT)["input_ids"][:SAMPLE_TOKENS]
        return [Example(ids, ids)], "a built-in text (the adapter's training data is not available)"
    n = len(samples)
    kinds = ([f"{n_held} held-out"] if n_held else []) + ([f"{n - n_held} training"] if n > n_held else [])
    return samples, f"{' and '.join(kinds)} document{'s' * (n != 1)} of {source} (first {SAMPLE_TOKENS} tokens each)"


def _recorded_held_out(meta: AdapterMeta, section: DataSection) -> list[int] | None:
    """The first source's held-out record indices as training recorded them; None for an adapter written before
    they were recorded. Raises ValueError if the data changed since: the indices would name other documents."""
    held = meta.data.sources[0].held_out if meta.data and meta.data.sources else None
    if held is None:
        return None
    if meta.data.content_hash not in (None, content_hash(section)):
        raise ValueError("the training data changed since the adapter was trained")
    return [int(i) for i in held]


def _sample_records(section: DataSection, held: list[int] | None, seed: int) -> tuple[list[dict], int, str]:
    """Up to SAMPLE_DOCS records of the first source, held-out ones first: (records, how many held out, source)."""
    first = section.sources[0]
    if isinstance(section.eval_split, str):
        held_records = read_records(first.model_copy(update={"path": section.eval_split}))[:SAMPLE_DOCS]
        return held_records, len(held_records), Path(section.eval_split).name
    records = read_records(first)
    if held is None and section.eval_split > 0 and len(records) >= MIN_DOCS_FOR_DOC_SPLIT:
        # An adapter from before the held-out documents were recorded: repeat data.prepare's split of the first
        # source (a fresh Random(seed) over its record indices), as lorakit then did.
        _, held = split_eval(list(range(len(records))), section.eval_split, random.Random(seed))
    held = held or []
    if any(not 0 <= i < len(records) for i in held):
        raise ValueError("the recorded held-out documents are not in the data")
    order = held + sorted(set(range(len(records))) - set(held))
    return [records[i] for i in order[:SAMPLE_DOCS]], min(len(held), SAMPLE_DOCS), Path(first.path).name


def forward(model, samples: list[Example]) -> list[torch.Tensor]:
    """Float32 logits on the CPU, one (tokens, vocab) tensor per sample."""
    dev = next(model.parameters()).device
    with torch.no_grad():
        return [
            model(input_ids=torch.tensor([s.input_ids], device=dev), use_cache=False).logits[0].float().cpu()
            for s in samples
        ]


def compare(model, samples: list[Example], reference: list[torch.Tensor]) -> tuple[float, float]:
    """The largest |logit - reference| over the samples (NaN if any is NaN), and the model's perplexity,
    holding one sample's logits at a time."""
    dev = next(model.parameters()).device
    diff, total, count = 0.0, 0.0, 0
    with torch.no_grad():
        for s, ref in zip(samples, reference, strict=True):
            lg = model(input_ids=torch.tensor([s.input_ids], device=dev), use_cache=False).logits[0].float().cpu()
            d = float((lg - ref).abs().max())
            if diff == diff and not d <= diff:
                diff = d
            t, c = _nll(lg, s)
            total, count = total + t, count + c
            del lg
    return diff, math.exp(total / max(count, 1))


def _nll(logits: torch.Tensor, s: Example) -> tuple[float, int]:
    """Summed next-token loss over supervised tokens (all tokens of a sample that has none), and their count."""
    labels = torch.tensor(s.labels[1:])
    if not (labels != IGNORE).any():
        labels = torch.tensor(s.input_ids[1:])
    loss = torch.nn.functional.cross_entropy(logits[:-1], labels, ignore_index=IGNORE, reduction="sum")
    return float(loss), int((labels != IGNORE).sum())


def perplexity(logits: list[torch.Tensor], samples: list[Example]) -> float:
    """exp(mean next-token loss) over supervised tokens (all tokens of a sample that has none)."""
    total, count = 0.0, 0
    for lg, s in zip(logits, samples, strict=True):
        t, c = _nll(lg, s)
        total, count = total + t, count + c
    return math.exp(total / max(count, 1))
