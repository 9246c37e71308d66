"""Data-preparation throughput: tokenize + pack a large text corpus, in its own process.

`python bench/dataprep.py SPEC.json`, spec["kind"] is "plain" (what SFTTrainer does with a
`{"text": ...}` dataset: its own `_prepare_dataset`, then `trl.pack_dataset`) or "lorakit"
(`lorakit.data.prepare`, then the packing SFTTrainer applies to lorakit's tokenized examples).
A "lorakit" spec names lorakit's cache folder (`cache_dir`) and the cache outcome it measures
(`expect_cache`): "stored" empties the folder first (a first run), "hit" reuses it (a rerun).
Also holds the corpus generator the driver uses.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import time
import types
from pathlib import Path

import common

FILE_BYTES = 2 << 20  # corpus files of about 2 MB


def vary(paragraph: str, rng: random.Random, shift: int) -> str:
    """A plausible variant: digits shifted, sentences shuffled within the paragraph."""
    text = re.sub(r"\d", lambda m: str((int(m.group()) + shift) % 10), paragraph)
    sentences = re.split(r"(?<=[.!?])\s+", text)
    rng.shuffle(sentences)
    return " ".join(sentences)


def write_corpus(directory: Path, megabytes: float, seed: int = 0) -> dict:
    """Repeat and vary the shipped paragraphs until the corpus holds `megabytes` of text."""
    directory.mkdir(parents=True, exist_ok=True)
    base = common.shipped_paragraphs()
    rng = random.Random(seed)
    target, written, files, parts, size, copy = int(megabytes * 2**20), 0, 0, [], 0, 0
    while written < target:
        order = list(base)
        rng.shuffle(order)
        for p in order:
            text = vary(p, rng, copy)
            parts.append(text)
            size += len(text.encode()) + 2
        copy += 1
        if size >= FILE_BYTES or written + size >= target:
            (directory / f"part-{files:03d}.txt").write_text("\n\n".join(parts) + "\n", encoding="utf-8")
            written, files, parts, size = written + size, files + 1, [], 0
    return {"dir": str(directory), "bytes": written, "files": files}


def read_corpus(directory: Path) -> list[str]:
    return [p for f in sorted(directory.glob("*.txt")) for p in common.read_paragraphs(f)]


def count_tokens(ds) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(pc.list_value_length(ds.data.column("input_ids"))).as_py())


def plain(spec: dict, tokenizer) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer, pack_dataset

    phases = {}
    started = time.perf_counter()
    ds = Dataset.from_dict({"text": read_corpus(Path(spec["corpus"]))})
    phases["read"] = round(time.perf_counter() - started, 3)
    # SFTTrainer._prepare_dataset as the trainer runs it: tokenize (adds EOS, labels). max_length=None
    # and packing=False so that it stops before packing, which we time separately below.
    args = SFTConfig(output_dir=str(Path(spec["workdir"]) / "out" / "prep"), max_length=None, use_cpu=True)
    trainer_like = types.SimpleNamespace(_tokenizer=tokenizer, chat_template=None, completion_only_loss=False)
    t = time.perf_counter()
    tokenized = SFTTrainer._prepare_dataset(trainer_like, ds, tokenizer, args, False, None, "train")
    phases["tokenize"] = round(time.perf_counter() - t, 3)
    tokens_in = count_tokens(tokenized)
    t = time.perf_counter()
    packed = pack_dataset(tokenized.select_columns(["input_ids", "labels"]), spec["block"], "bfd")
    phases["pack"] = round(time.perf_counter() - t, 3)
    return {"tokens_in": tokens_in, "tokens_out": count_tokens(packed), "rows_out": len(packed), "phases": phases}


def lorakit_path(spec: dict, tokenizer) -> dict:
    from trl import pack_dataset

    from lorakit.data.prepare import prepare
    from lorakit.recipe import DataSection

    section = DataSection(
        sources=[{"path": spec["corpus"], "format": "text", "split": "paragraph"}],
        eval_split=0,
        block_size=spec["block"],
    )
    phases = {}
    started = time.perf_counter()
    prepared = prepare(section, tokenizer, seed=42)
    phases["prepare"] = round(time.perf_counter() - started, 3)
    if prepared.cache != spec["expect_cache"]:
        raise SystemExit(f"data cache: expected {spec['expect_cache']!r}, got {prepared.cache!r}")
    t = time.perf_counter()
    train_ds, _ = prepared.datasets()
    phases["to_dataset"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    packed = pack_dataset(train_ds.select_columns(["input_ids", "labels"]), spec["block"], "bfd")
    phases["pack"] = round(time.perf_counter() - t, 3)
    tokens_in = prepared.report["train_tokens"]
    return {
        "tokens_in": tokens_in,
        "tokens_out": count_tokens(packed),
        "rows_out": len(packed),
        "phases": phases,
        "cache": prepared.cache,
    }


def main(spec_path: str) -> None:
    import trl  # noqa: F401
    from transformers import AutoTokenizer

    import lorakit.data.prepare  # noqa: F401  (imports are not part of the timed phases)

    spec = json.loads(Path(spec_path).read_text())
    if spec["kind"] == "lorakit":
        # As the CLI runs: lorakit turns the tokenizer's threads on for its batched calls only.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ["LORAKIT_CACHE"] = spec["cache_dir"]
        if spec["expect_cache"] == "stored":
            shutil.rmtree(Path(spec["cache_dir"]) / "data", ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    result = (plain if spec["kind"] == "plain" else lorakit_path)(spec, tokenizer)
    seconds = sum(result["phases"].values())
    result.update(
        name=spec["name"],
        seconds=round(seconds, 2),
        tokens_per_s=round(result["tokens_in"] / seconds, 1),
        mb_per_s=round(spec["corpus_bytes"] / 2**20 / seconds, 3),
        peak_rss_mb=common.vm_hwm_mb(),
    )
    Path(spec["out"]).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1])
