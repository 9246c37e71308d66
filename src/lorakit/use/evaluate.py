"""Loss and perplexity on a data file: the base model, adapters and merged models side by side."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from lorakit.data.formats import chunk, format_records
from lorakit.data.sources import read_records
from lorakit.data.tokens import IGNORE, Example
from lorakit.errors import LorakitError
from lorakit.recipe import DataSource
from lorakit.store import loader

BLOCK_SIZE = 256


def examples(path: Path, fmt: str, tokenizer, block_size: int = BLOCK_SIZE) -> list[Example]:
    """The file read and formatted as training reads it, cut into blocks of `block_size` tokens."""
    try:
        src = DataSource(path=str(path), format=fmt)
    except ValueError as e:
        raise LorakitError(f"--data {path} --format {fmt}: {e}") from None
    blocks = chunk(format_records(tokenizer, read_records(src), fmt), block_size)
    if not blocks:
        raise LorakitError(f"{path}: no tokens to evaluate on")
    return blocks


def loss(model, blocks: list[Example]) -> tuple[float, int]:
    """Mean next-token loss over every supervised token of `blocks` (one block at a time), and the count."""
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for b in blocks:
            logits = model(input_ids=torch.tensor([b.input_ids], device=dev), use_cache=False).logits[0, :-1]
            labels = torch.tensor(b.labels[1:], device=dev)
            total += float(
                torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")
            )
            count += int((labels != IGNORE).sum())
    return total / max(count, 1), count


def row(name: str, value: tuple[float, int]) -> dict[str, Any]:
    mean, count = value
    return {"model": name, "loss": mean, "perplexity": math.exp(mean), "tokens": count}


def evaluate(
    data: Path,
    fmt: str = "text",
    adapters: list[str] | None = None,
    base_only: bool = False,
    model_dirs: list[str] | None = None,
    store: str | Path = "adapters",
    base: str | None = None,
    block_size: int = BLOCK_SIZE,
    trust_remote_code: bool = False,
) -> list[dict[str, Any]]:
    """One row per model: the base (if `base_only`), each adapter, each model folder."""
    adapters, model_dirs = list(adapters or []), list(model_dirs or [])
    if not (adapters or base_only or model_dirs):
        raise LorakitError("name what to evaluate: --base-only, --adapter NAME or --model DIR")
    rows = []
    if adapters or base_only:
        loaded = loader.load(store, adapters or None, base, verb="eval", trust_remote_code=trust_remote_code)
        blocks = examples(data, fmt, loaded.tokenizer, block_size)
        if base_only and loaded.adapters:
            with loaded.model.disable_adapter():
                rows.append(row("base", loss(loaded.model, blocks)))
        elif base_only:
            rows.append(row("base", loss(loaded.model, blocks)))
        for n in loaded.adapters:
            loaded.model.set_adapter(n)
            rows.append(row(f"adapter {n}", loss(loaded.model, blocks)))
        del loaded
    for d in model_dirs:
        plain = loader.load(store, None, base=d, verb="eval", dtype="float32", trust_remote_code=trust_remote_code)
        rows.append(row(f"model {d}", loss(plain.model, examples(data, fmt, plain.tokenizer, block_size))))
        del plain
    return rows
