"""Training data: sources -> records -> formatted, tokenized examples with loss masks.

Every example is a list of token ids and a list of labels (-100 where no loss is taken),
ending with the end-of-sequence token so the model learns to stop. SFTTrainer then packs
them into `block_size` blocks.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError
from lorakit.recipe import DataSection, DataSource

TEXT_SUFFIXES = {".txt", ".md"}
TABLE_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet"}
IGNORE = -100
MIN_DOCS_FOR_DOC_SPLIT = 5
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


@dataclass
class Prepared:
    train: list[Example]
    eval: list[Example]
    report: dict[str, Any] = field(default_factory=dict)

    def datasets(self):
        from datasets import Dataset

        def to_ds(examples: list[Example]):
            return Dataset.from_dict(
                {"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]}
            )

        return to_ds(self.train), (to_ds(self.eval) if self.eval else None)


# --- reading ----------------------------------------------------------------------------------


def source_files(path: Path) -> list[Path]:
    if not path.exists():
        raise LorakitError(f"data source not found: {path}")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES | TABLE_SUFFIXES)
    if not files:
        raise LorakitError(
            f"{path}: no data files in this folder (looked for {', '.join(sorted(TEXT_SUFFIXES | TABLE_SUFFIXES))})"
        )
    return files


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise LorakitError(
            f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at line {line}, offset {e.start}); "
            "convert it, e.g. `iconv -f latin1 -t utf-8`"
        ) from None


def _split_text(text: str, split: str) -> list[str]:
    if split == "file":
        parts = [text]
    elif split == "paragraph":
        parts = re.split(r"\n[ \t\r]*\n", text.replace("\r\n", "\n"))
    else:
        parts = text.splitlines()
    return [p.strip() for p in parts if p.strip()]


def _read_table(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix
    if suffix == ".jsonl":
        rows = []
        # Split on newlines only: JSON strings may hold U+2028 and friends, which splitlines() breaks at.
        for i, line in enumerate(_read_text(path).split("\n"), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LorakitError(f"{path}: line {i} is not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict):
                raise LorakitError(f"{path}: line {i} is a {type(row).__name__}, expected a JSON object")
            rows.append(row)
        return rows
    if suffix == ".json":
        try:
            data = json.loads(_read_text(path))
        except json.JSONDecodeError as e:
            raise LorakitError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise LorakitError(f'{path}: expected a JSON list of objects (or {{"data": [...]}})')
        return data
    if suffix == ".csv":
        try:
            return list(csv.DictReader(io.StringIO(_read_text(path), newline="")))
        except csv.Error as e:
            raise LorakitError(f"{path}: cannot read CSV: {e}") from None
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise LorakitError(f"{path}: cannot read parquet: {e}") from None


def _field(row: dict, name: str, path: Path, index: int) -> Any:
    if name not in row:
        raise LorakitError(
            f"{path}: row {index + 1} has no field {name!r} (fields: {', '.join(map(str, row)) or 'none'}); "
            "set `field:` on this source"
        )
    if row[name] is None:
        raise LorakitError(f"{path}: row {index + 1}: field {name!r} is empty (null)")
    return row[name]


def read_records(src: DataSource) -> list[dict[str, Any]]:
    """Read one source into records shaped for its format."""
    path = Path(src.path)
    if _is_saved_dataset(path):
        from datasets import load_from_disk

        ds = load_from_disk(str(path))
        rows = list(ds["train"] if hasattr(ds, "keys") and "train" in ds else ds)
        return _shape(rows, src, path)
    records: list[dict[str, Any]] = []
    for f in source_files(path):
        if f.suffix in TEXT_SUFFIXES:
            if src.format != "text":
                raise LorakitError(f"{f}: format {src.format!r} needs a table file (.jsonl/.json/.csv/.parquet)")
            records += [{"text": t} for t in _split_text(_read_text(f), src.split)]
        else:
            records += _shape(_read_table(f), src, f)
    return records


def _shape(rows: list[dict], src: DataSource, path: Path) -> list[dict[str, Any]]:
    out = []
    for i, row in enumerate(rows):
        if src.format == "text":
            out.append({"text": str(_field(row, src.field or "text", path, i))})
        elif src.format == "completion":
            out.append(
                {
                    "prompt": str(_field(row, "prompt", path, i)),
                    "completion": str(_field(row, "completion", path, i)),
                }
            )
        elif src.format == "instruction":
            out.append(
                {
                    "instruction": str(_field(row, src.field or "instruction", path, i)),
                    "input": str(row.get("input") or ""),
                    "output": str(_field(row, "output", path, i)),
                }
            )
        else:
            msgs = _field(row, src.field or "messages", path, i)
            if not isinstance(msgs, list) or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in msgs
            ):
                raise LorakitError(f"{path}: row {i + 1}: messages must be a list of {{role, content}} objects")
            if not any(m["role"] == "assistant" for m in msgs):
                raise LorakitError(f"{path}: row {i + 1} has no assistant message to learn from")
            out.append({"messages": msgs})
    return out


# --- formatting and tokenizing ----------------------------------------------------------------


def prompt_style(tokenizer, formats: set[str]) -> str:
    """How prompts are wrapped at generation time: 'chat', 'alpaca' or 'raw'."""
    if formats & {"chat", "instruction"}:
        return "chat" if tokenizer.chat_template else "alpaca"
    return "raw"


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def tokenize_texts(tokenizer, texts: list[str]) -> list[Example]:
    if not texts:
        return []
    eos = tokenizer.eos_token_id
    batch = tokenizer(texts, add_special_tokens=True)["input_ids"]
    return [Example(ids + [eos], ids + [eos]) for ids in batch]


def tokenize_completion(tokenizer, prompt: str, completion: str) -> Example:
    p = _ids(tokenizer, prompt, True)
    c = _ids(tokenizer, completion, False) + [tokenizer.eos_token_id]
    return Example(p + c, [IGNORE] * len(p) + c)


def tokenize_chat(tokenizer, messages: list[dict]) -> Example:
    """Render with the chat template; loss on assistant turns only, through their end-of-turn token."""
    render = tokenizer.apply_chat_template
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prefix = render(messages[:i], tokenize=False, add_generation_prompt=True)
        full = render(messages[: i + 1], tokenize=False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise LorakitError(
                "this chat template renders a conversation differently from its prefixes, so assistant "
                "turns cannot be located; use format: text for this data"
            )
        context = _ids(tokenizer, prefix[len(done) :], special=not done)
        answer = _ids(tokenizer, full[len(prefix) :], special=False)
        # Supervise the answer up to and including its end-of-turn token, not the whitespace after it.
        stop = _last_stop(answer, tokenizer)
        ids += context + answer
        labels += [IGNORE] * len(context) + answer[:stop] + [IGNORE] * (len(answer) - stop)
        done = full
    return Example(ids, labels)


def _last_stop(answer: list[int], tokenizer) -> int:
    stops = {tokenizer.eos_token_id}
    for i in range(len(answer) - 1, -1, -1):
        if answer[i] in stops:
            return i + 1
    return len(answer)


def format_records(tokenizer, records: list[dict], fmt: str) -> list[Example]:
    if fmt == "text":
        return tokenize_texts(tokenizer, [r["text"] for r in records])
    if fmt == "completion":
        return [tokenize_completion(tokenizer, r["prompt"], r["completion"]) for r in records]
    if fmt == "chat" and not tokenizer.chat_template:
        raise LorakitError("format chat needs a tokenizer with a chat template; this model has none (use instruction)")
    if fmt == "instruction":
        if tokenizer.chat_template:
            return [tokenize_chat(tokenizer, instruction_messages(r)) for r in records]
        return [
            tokenize_completion(tokenizer, alpaca_prompt(r["instruction"], r["input"]), r["output"]) for r in records
        ]
    return [tokenize_chat(tokenizer, r["messages"]) for r in records]


def instruction_messages(r: dict) -> list[dict]:
    user = r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    if input_text:
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT.format(instruction=instruction)


def chunk(examples: list[Example], block_size: int) -> list[Example]:
    """Split examples longer than a block; drop pieces with nothing to learn."""
    out = []
    for e in examples:
        for i in range(0, len(e.input_ids), block_size):
            piece = Example(e.input_ids[i : i + block_size], e.labels[i : i + block_size])
            if any(t != IGNORE for t in piece.labels[1:]):
                out.append(piece)
    return out


# --- mixing, splitting ------------------------------------------------------------------------


def mix(per_source: list[list[Example]], weights: list[float], rng: random.Random) -> list[list[Example]]:
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


def n_tokens(examples: list[Example]) -> int:
    return sum(len(e.input_ids) for e in examples)


def content_hash(section: DataSection) -> str:
    h = hashlib.sha256()
    for src in section.sources:
        for f in source_files(Path(src.path)) if not _is_saved_dataset(Path(src.path)) else []:
            h.update(f.name.encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
        h.update(json.dumps(src.model_dump(exclude={"path"}), sort_keys=True).encode())
    return "sha256:" + h.hexdigest()


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists())


def prepare(section: DataSection, tokenizer, seed: int) -> Prepared:
    """Read, format, tokenize, chunk, mix and split every source; check there is enough to train on."""
    rng = random.Random(seed)
    block = section.block_size
    per_source: list[list[Example]] = []
    per_source_eval: list[Example] = []
    report_sources = []
    for src in section.sources:
        records = read_records(src)
        docs = format_records(tokenizer, records, src.format)
        if not chunk(docs, block):
            raise LorakitError(f"{src.path}: no usable text in this source (empty, or nothing to learn from)")
        # Hold out whole documents when there are enough of them, else block-sized pieces.
        fraction = section.eval_split if isinstance(section.eval_split, float) else 0.0
        if len(docs) >= MIN_DOCS_FOR_DOC_SPLIT:
            train_docs, held_docs = split_eval(docs, fraction, rng)
            train, held = chunk(train_docs, block), chunk(held_docs, block)
        else:
            train, held = split_eval(chunk(docs, block), fraction, rng)
        examples = train + held
        per_source.append(train)
        per_source_eval += held
        report_sources.append(
            {
                "path": src.path,
                "format": src.format,
                "weight": src.weight,
                "documents": len(records),
                "examples": len(examples),
            }
        )
    if isinstance(section.eval_split, str):
        eval_src = section.sources[0].model_copy(update={"path": section.eval_split, "weight": 1.0})
        per_source_eval = chunk(format_records(tokenizer, read_records(eval_src), eval_src.format), block)
    mixed = mix(per_source, [s.weight for s in section.sources], rng)
    train = [e for m in mixed for e in m]
    rng.shuffle(train)
    total = n_tokens(train)
    if total < block:
        raise LorakitError(
            f"training data has {total} tokens, less than one block (data.block_size={block}); "
            "add data or lower data.block_size"
        )
    for info, m in zip(report_sources, mixed, strict=True):
        info["train_tokens"] = n_tokens(m)
        info["share"] = round(n_tokens(m) / total, 4)
    report = {
        "sources": report_sources,
        "train_tokens": total,
        "train_examples": len(train),
        "eval_tokens": n_tokens(per_source_eval),
        "eval_examples": len(per_source_eval),
        "supervised_tokens": sum(sum(t != IGNORE for t in e.labels) for e in train),
    }
    return Prepared(train, per_source_eval, report)
