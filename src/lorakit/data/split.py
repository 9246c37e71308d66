"""Mixing sources by weight and holding out documents for evaluation."""

from __future__ import annotations

import random

MIN_DOCS_FOR_DOC_SPLIT = 5


def mix(per_source: list[list], weights: list[float], rng: random.Random) -> list[list]:
    """Scale each source by its weight: whole copies plus a random share for the fraction."""
    mixed = []
    for examples, w in zip(per_source, weights, strict=True):
        whole, frac = int(w), w - int(w)
        # A positive fraction keeps at least one example: a small source never silently vanishes.
        n_frac = max(1, round(len(examples) * frac)) if frac > 0 else 0
        picked = examples * whole + rng.sample(examples, min(n_frac, len(examples)))
        mixed.append(picked)
    return mixed


def split_eval(docs: list, fraction: float, rng: random.Random) -> tuple[list, list]:
    """Hold out a random `fraction` of the items (at least one), keeping their order."""
    if fraction <= 0 or len(docs) < 2:
        return docs, []
    order = list(range(len(docs)))
    rng.shuffle(order)
    held = set(order[: max(1, round(len(docs) * fraction))])
    return [d for i, d in enumerate(docs) if i not in held], [docs[i] for i in sorted(held)]
