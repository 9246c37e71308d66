"""Reading data sources: text, JSON Lines, JSON, CSV, parquet and saved datasets, into records shaped for a format."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError
from lorakit.recipe import DataSource

TEXT_SUFFIXES = {".txt", ".md"}
TABLE_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet"}


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
    if is_saved_dataset(path):
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


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists())
