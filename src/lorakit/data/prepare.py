"""Preparing training data: every source read, formatted, tokenized, chunked, split and mixed (or from the cache)."""

from __future__ import annotations

import logging
import random
import time

from lorakit.data.cache import cache_key, cache_root, load_cached, save_cached
from lorakit.data.content import data_content
from lorakit.data.formats import format_tokens
from lorakit.data.sources import read_records
from lorakit.data.split import MIN_DOCS_FOR_DOC_SPLIT, mix, split_eval
from lorakit.data.tokens import Example, Prepared, Tokens, offsets_of
from lorakit.errors import LorakitError
from lorakit.recipe import DataSection

log = logging.getLogger("lorakit")


def prepare(section: DataSection, tokenizer, seed: int) -> Prepared:
    """Prepared data for this section, tokenizer and seed: from the cache when it holds it, else built (and stored)."""
    started = time.perf_counter()
    content = data_content(section)  # the files' digests, taken once: the cache key and the resume key share them
    if not section.cache:
        prepared = build(section, tokenizer, seed)
    else:
        key = cache_key(section, content, tokenizer, seed)
        entry = cache_root() / key
        prepared = load_cached(entry, key)
        if prepared is None:
            prepared = build(section, tokenizer, seed)
            prepared.cache_key = key
            try:
                save_cached(prepared, entry, key)
                prepared.cache = "stored"
            except OSError as e:
                prepared.cache = f"{entry.parent}: {e.strerror or e}"
                log.warning("data: could not cache the prepared data in %s (%s)", entry.parent, e)
    prepared.seconds = time.perf_counter() - started
    prepared.content = content
    log.info("data: %s", prepared.origin())
    return prepared


def build(section: DataSection, tokenizer, seed: int) -> Prepared:
    """Read, format, tokenize, chunk, mix and split every source; check there is enough to train on."""
    rng = random.Random(seed)
    block = section.block_size
    fraction = section.eval_split if isinstance(section.eval_split, float) else 0.0
    per_source: list[Tokens] = []
    held_out: list[Tokens] = []
    report_sources = []
    for src in section.sources:
        records = read_records(src)
        docs = format_tokens(tokenizer, records, src.format)
        pieces = docs.chunk(block)
        if not len(pieces):
            raise LorakitError(f"{src.path}: no usable text in this source (empty, or nothing to learn from)")
        # Hold out whole documents when there are enough of them, else block-sized pieces.
        # Indices of the records held out whole, kept in the report: merge verification reads them rather than
        # repeating this split (a repeat would silently drift onto training data if the split ever changed).
        held_docs: list[int] = []
        if len(docs) >= MIN_DOCS_FOR_DOC_SPLIT:
            kept, held_docs = split_eval(list(range(len(docs))), fraction, rng)
            train, evals = docs.take(kept).chunk(block), docs.take(held_docs).chunk(block)
        else:
            kept, held = split_eval(list(range(len(pieces))), fraction, rng)
            train, evals = pieces.take(kept), pieces.take(held)
        per_source.append(train)
        held_out.append(evals)
        report_sources.append(
            {
                "path": src.path,
                "format": src.format,
                "weight": src.weight,
                "documents": len(records),
                "examples": len(train) + len(evals),
                "held_out": held_docs,
            }
        )
    if isinstance(section.eval_split, str):
        eval_src = section.sources[0].model_copy(update={"path": section.eval_split, "weight": 1.0})
        held_out = [format_tokens(tokenizer, read_records(eval_src), eval_src.format).chunk(block)]
    # Mix and shuffle positions into the sources' examples: the same draws as on the examples themselves.
    picks = mix([list(range(len(t))) for t in per_source], [s.weight for s in section.sources], rng)
    firsts = offsets_of([len(t) for t in per_source])
    order = [int(first) + i for first, picked in zip(firsts[:-1], picks, strict=True) for i in picked]
    rng.shuffle(order)
    train = Tokens.concat(per_source).take(order).compact()
    eval_set = Tokens.concat(held_out).compact()
    total = train.n_tokens()
    if total < block:
        raise LorakitError(
            f"training data has {total} tokens, less than one block (data.block_size={block}); "
            "add data or lower data.block_size"
        )
    for info, tokens, picked in zip(report_sources, per_source, picks, strict=True):
        info["train_tokens"] = tokens.take(picked).n_tokens()
        info["share"] = round(info["train_tokens"] / total, 4)
    report = {
        "sources": report_sources,
        "train_tokens": total,
        "train_examples": len(train),
        "eval_tokens": eval_set.n_tokens(),
        "eval_examples": len(eval_set),
        "supervised_tokens": train.n_supervised(),
    }
    return Prepared(train, eval_set, report)


def n_tokens(examples: list[Example]) -> int:
    return sum(len(e.input_ids) for e in examples)
