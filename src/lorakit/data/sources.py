"""Reading data sources: text, JSON Lines, JSON, CSV, parquet and saved datasets, into records shaped for a format."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError, short
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


def _read_table(path: Path) -> tuple[list[dict[str, Any]], list[int] | None]:
    """The rows of a table file, and for JSON Lines the line each row is on (errors name the line)."""
    suffix = path.suffix
    if suffix == ".jsonl":
        rows, lines = [], []
        # Split on newlines only: JSON strings may hold U+2028 and friends, which splitlines() breaks at.
        for i, line in enumerate(_read_text(path).split("\n"), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LorakitError(f"{path}: line {i} is not valid JSON ({e.msg}, column {e.colno})") from None
            except RecursionError:
                raise LorakitError(f"{path}: line {i} nests JSON too deeply to read") from None
            if not isinstance(row, dict):
                raise LorakitError(f"{path}: line {i} is a {type(row).__name__}, expected a JSON object")
            rows.append(row)
            lines.append(i)
        return rows, lines
    if suffix == ".json":
        try:
            data = json.loads(_read_text(path))
        except json.JSONDecodeError as e:
            raise LorakitError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        except RecursionError:
            raise LorakitError(f"{path}: nests JSON too deeply to read") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise LorakitError(f'{path}: expected a JSON list of objects (or {{"data": [...]}})')
        return data, None
    if suffix == ".csv":
        try:
            return list(csv.DictReader(io.StringIO(_read_text(path), newline=""))), None
        except csv.Error as e:
            raise LorakitError(f"{path}: cannot read CSV: {e}") from None
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist(), None
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise LorakitError(f"{path}: cannot read parquet: {e}") from None


class Rows:
    """Where each row of one file is, for messages that name it: `line N` in JSON Lines, `row N` elsewhere."""

    def __init__(self, path: Path, lines: list[int] | None):
        self.path, self.lines = path, lines

    def at(self, index: int) -> str:
        return f"{self.path}: line {self.lines[index]}" if self.lines else f"{self.path}: row {index + 1}"


def _field(row: dict, name: str, rows: Rows, index: int) -> Any:
    if name not in row:
        raise LorakitError(
            f"{rows.at(index)} has no field {name!r} (fields: {', '.join(map(str, row)) or 'none'}); "
            "set `field:` on this source"
        )
    if row[name] is None:
        raise LorakitError(f"{rows.at(index)}: field {name!r} is empty (null)")
    return row[name]


def _string(row: dict, name: str, rows: Rows, index: int) -> str:
    """A text field: a string (numbers are read as their text); a list or an object is a mistake, said so."""
    value = _field(row, name, rows, index)
    if isinstance(value, dict | list):
        raise LorakitError(f"{rows.at(index)}: field {name!r} is a JSON {_kind(value)}, expected a string")
    return str(value)


def _kind(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def read_records(src: DataSource) -> list[dict[str, Any]]:
    """Read one source into records shaped for its format."""
    path = Path(src.path)
    if is_saved_dataset(path):
        return _shape(_saved_rows(path), src, Rows(path, None))
    records: list[dict[str, Any]] = []
    for f in source_files(path):
        if f.suffix in TEXT_SUFFIXES:
            if src.format != "text":
                raise LorakitError(f"{f}: format {src.format!r} needs a table file (.jsonl/.json/.csv/.parquet)")
            records += [{"text": t} for t in _split_text(_read_text(f), src.split)]
        else:
            rows, lines = _read_table(f)
            records += _shape(rows, src, Rows(f, lines))
    return records


def _saved_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a dataset saved with `save_to_disk` (its train split, when it has splits)."""
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as e:  # datasets raises several unrelated types for a folder that is not what it says
        raise LorakitError(
            f"{path} looks like a saved dataset (it has {_saved_marker(path)}) but datasets cannot load it: "
            f"{short(e)}; point data at the files themselves, or save the dataset again with save_to_disk"
        ) from None
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise LorakitError(f"{path}: a saved dataset with splits {', '.join(ds)} but no 'train' split")
        ds = ds["train"]
    if not isinstance(ds, Dataset):
        raise LorakitError(f"{path}: not a saved dataset of rows ({type(ds).__name__})")
    return list(ds)


def _saved_marker(path: Path) -> str:
    return "dataset_info.json" if (path / "dataset_info.json").exists() else "state.json"


ROLES = {"system", "user", "assistant", "tool"}
# ShareGPT's conversation format ({"from": "human", "value": ...}) as axolotl and LLaMA-Factory read it.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "tool": "tool", "observation": "tool"}


def _messages(row: dict, src: DataSource, rows: Rows, index: int) -> list[dict[str, Any]]:
    """One conversation, checked: a list of {role, content} (or ShareGPT {from, value}) with known roles and text
    contents (an assistant turn calling tools may have none), that starts with a system or user message and has an
    assistant message to learn from. Other keys of a message (tool_calls, name) go to the chat template as given."""
    name = src.field or ("messages" if "messages" in row or "conversations" not in row else "conversations")
    msgs = _field(row, name, rows, index)
    where = f"{rows.at(index)}: {name}"
    if not isinstance(msgs, list) or not msgs:
        raise LorakitError(f"{where} must be a non-empty list of {{role, content}} objects")
    out = []
    for j, m in enumerate(msgs):
        at = f"{where}[{j}]"
        if not isinstance(m, dict):
            raise LorakitError(f"{at} is a JSON {_kind(m)}, expected a {{role, content}} object")
        sharegpt = "role" not in m and "from" in m
        role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
        role, content = m.get(role_key), m.get(content_key)
        if not isinstance(role, str):
            raise LorakitError(f"{at}.{role_key} must be a string, got {_kind(role)}")
        role = SHAREGPT_ROLES.get(role, role) if sharegpt else role
        if role not in ROLES:
            raise LorakitError(f"{at}.{role_key}: unknown role {role!r} (known: {', '.join(sorted(ROLES))})")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            content = "".join(str(p.get("text", "")) for p in content)  # OpenAI-style text parts
        calls = content is None and role == "assistant" and bool(m.get("tool_calls"))  # a turn that calls tools
        if not isinstance(content, str) and not calls:
            raise LorakitError(f"{at}.{content_key} must be a string, got {_kind(content)}")
        extra = {} if sharegpt else {k: v for k, v in m.items() if k not in ("role", "content")}  # tool_calls, name
        out.append({"role": role, "content": content, **extra})
    if next((m["role"] for m in out if m["role"] != "system"), None) == "assistant":
        raise LorakitError(f"{where}: the conversation starts with an assistant message; start it with a user one")
    if not any(m["role"] == "assistant" for m in out):
        raise LorakitError(f"{where}: no assistant message to learn from")
    return out


def _shape(rows: list[dict], src: DataSource, where: Rows) -> list[dict[str, Any]]:
    out = []
    for i, row in enumerate(rows):
        if src.format == "text":
            out.append({"text": _string(row, src.field or "text", where, i)})
        elif src.format == "completion":
            out.append({"prompt": _string(row, "prompt", where, i), "completion": _string(row, "completion", where, i)})
        elif src.format == "instruction":
            extra = row.get("input")
            out.append(
                {
                    "instruction": _string(row, src.field or "instruction", where, i),
                    "input": _string(row, "input", where, i) if extra not in (None, "") else "",
                    "output": _string(row, "output", where, i),
                }
            )
        else:
            out.append({"messages": _messages(row, src, where, i)})
    return out


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists())
