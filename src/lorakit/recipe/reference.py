"""The recipe's JSON Schema and the generated key reference in the README (`make docs`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from lorakit.recipe.schema import (
    BaseModelSection,
    DataSection,
    DataSource,
    LoraSection,
    OutputSection,
    Recipe,
    TrainSection,
)


def recipe_json_schema() -> dict[str, Any]:
    schema = Recipe.model_json_schema()
    schema["title"] = "lorakit recipe"
    base = schema["properties"]["base_model"]
    ref = {k: base.pop(k) for k in ("$ref", "allOf") if k in base}
    base["anyOf"] = [{"type": "string", "description": "Shorthand for base_model.name."}, ref]
    return schema


def reference_markdown() -> str:
    """Every recipe key with its type, default and description, as a markdown table."""
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    sections = {
        "base_model": BaseModelSection,
        "lora": LoraSection,
        "data": DataSection,
        "data.sources[]": DataSource,
        "train": TrainSection,
        "output": OutputSection,
    }
    for prefix, cls in sections.items():
        for name, f in cls.model_fields.items():
            if name == "sources":
                continue
            default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
            cells = [f"`{prefix}.{name}`", _type_name(f.annotation), f"`{default}`", f.description or ""]
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"


def _type_name(ann: Any) -> str:
    """A short, readable type: `int`, `str or null`, `one of: none, 4bit, 8bit`, `list of str`."""
    args = getattr(ann, "__args__", ())
    origin = getattr(ann, "__origin__", None)
    if origin is Literal:
        return "one of: " + ", ".join(str(a) for a in args)
    if origin is list:
        return "list of " + _type_name(args[0])
    if args:  # a union
        return " or ".join(_type_name(a) for a in args)
    if ann is type(None):
        return "null"
    return getattr(ann, "__name__", str(ann))


REFERENCE_START = "<!-- recipe-reference:start -->"
REFERENCE_END = "<!-- recipe-reference:end -->"


def update_reference(readme: Path) -> bool:
    """Rewrite the generated recipe reference between the markers in `readme`; True if it changed."""
    text = readme.read_text()
    head, _, rest = text.partition(REFERENCE_START)
    _, _, tail = rest.partition(REFERENCE_END)
    new = f"{head}{REFERENCE_START}\n{reference_markdown()}{REFERENCE_END}{tail}"
    if new != text:
        readme.write_text(new)
    return new != text
