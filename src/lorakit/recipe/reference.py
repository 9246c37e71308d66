"""The recipe's JSON Schema and the generated key reference in the README (`make docs`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from lorakit.recipe.schema import (
    NAME_PATTERN,
    BaseModelSection,
    DataSection,
    DataSource,
    LoraSection,
    OutputSection,
    Recipe,
    TrainSection,
)


def recipe_json_schema() -> dict[str, Any]:
    """The recipe's JSON Schema: pydantic's, with the rules the validator checks in code written out, so that a
    recipe passes the schema exactly when it passes `lorakit recipe validate` (tested on good and bad recipes)."""
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **Recipe.model_json_schema()}
    schema["title"] = "lorakit recipe"
    base = schema["properties"]["base_model"]
    ref = {k: base.pop(k) for k in ("$ref", "allOf") if k in base}
    base["anyOf"] = [{"type": "string", "description": "Shorthand for base_model.name."}, ref]
    defs = schema["$defs"]
    _number_branch(defs["TrainSection"]["properties"]["learning_rate"]).update(exclusiveMinimum=0, exclusiveMaximum=1)
    _number_branch(defs["DataSection"]["properties"]["eval_split"]).update(minimum=0, maximum=0.5)
    checkpointing = defs["TrainSection"]["properties"]["gradient_checkpointing"]
    schema_types = checkpointing.pop("enum", None), checkpointing.pop("type", None)
    checkpointing["anyOf"] = [{"enum": schema_types[0], "type": "string"}, {"type": "boolean"}]  # YAML's on/off
    targets = defs["LoraSection"]["properties"]["target_modules"]
    next(b for b in targets["anyOf"] if b.get("type") == "array")["minItems"] = 1
    name = defs["OutputSection"]["properties"]["name"]
    next(b for b in name["anyOf"] if b.get("type") == "string")["pattern"] = rf"^(?!.*\.\.){NAME_PATTERN.pattern}$"
    schema["allOf"] = [_not_both(
        {"base_model": {"quantization": {"enum": ["4bit", "8bit"]}, "dtype": {"const": "float16"}},
         "train": {"precision": {"const": "bf16"}}}), _not_both(
        {"base_model": {"quantization": {"const": "8bit"}}, "lora": {"use_dora": {"const": True}}})]  # fmt: skip
    return schema


def _number_branch(prop: dict[str, Any]) -> dict[str, Any]:
    return next(b for b in prop["anyOf"] if b.get("type") == "number")


def _not_both(sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A schema rule: not every one of these section values at once (the validator's cross-field checks)."""
    return {
        "not": {
            "required": list(sections),
            "properties": {
                s: {"type": "object", "required": list(keys), "properties": keys} for s, keys in sections.items()
            },
        }
    }


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
