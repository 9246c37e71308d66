"""Reading a recipe: YAML safely, `--set` overrides, validation with every problem reported at once.

Loading a recipe never touches torch, a model or data: every problem in a recipe is
reported here, all at once, before anything expensive starts."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from lorakit.errors import LorakitError
from lorakit.recipe.schema import Recipe, YamlFloat, check_name


class RecipeError(LorakitError):
    """A recipe (or an override) is invalid; `problems` lists (key path, message) pairs."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        n = len(self.problems)
        lines = [f"{self.source}: {n} problem{'s' if n != 1 else ''}"]
        lines += [f"  {loc}: {msg}" if loc else f"  {msg}" for loc, msg in self.problems]
        return "\n".join(lines)


def _did_you_mean(model: type[BaseModel], loc: tuple[Any, ...], key: str) -> str:
    """Find the model class at `loc` and suggest its closest field name to `key`."""
    cls: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            break
        ann = field.annotation
        cls = next(
            (a for a in (ann, *getattr(ann, "__args__", ())) if isinstance(a, type) and issubclass(a, BaseModel)),
            None,
        )
        if cls is None:
            return ""
    names = list(getattr(cls, "model_fields", {}))
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(names)})"


def _problems(err: ValidationError) -> list[tuple[str, str]]:
    out = []
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        if e["type"] == "extra_forbidden":
            path = ".".join(str(p) for p in loc)
            out.append((path, "unknown key" + _did_you_mean(Recipe, loc[:-1], str(loc[-1]))))
            continue
        # Pydantic adds the union member it tried ("list[str]", "literal[...]", "float") to the
        # location of a known field; drop those tags (the field names themselves are all known).
        clean = tuple(p for p in loc if not (isinstance(p, str) and _is_union_tag(p)))
        path = ".".join(str(p) for p in clean)
        if e["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            shown = repr(e.get("input"))
            # Our own validators (value_error) already name the value in their message.
            if "input" in e and not isinstance(e["input"], dict | list) and e["type"] != "value_error":
                msg += f", got {shown}"
        out.append((path, msg))
    # A union failure yields one message per member; keep the first per key path.
    seen: dict[str, str] = {}
    for path, msg in out:
        seen.setdefault(path, msg)
    return list(seen.items())


def _is_union_tag(part: str) -> bool:
    return "[" in part or part in {"str", "float", "int", "bool", "none", "function-after", "function-before"}


class RecipeYAML(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers as YAML 1.2 does: `1e-3` (no dot) is a float, not a string."""


RecipeYAML.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _float(loader: RecipeYAML, node: yaml.ScalarNode) -> YamlFloat:
    value = YamlFloat(loader.construct_yaml_float(node))
    value.text = node.value
    return value


RecipeYAML.add_constructor("tag:yaml.org,2002:float", _float)


def read_text_yaml(text: str) -> Any:
    return yaml.load(text, Loader=RecipeYAML)  # noqa: S506  (a SafeLoader: no Python objects are built)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `a.b.c=value`; the value is read as YAML (so numbers, booleans, lists work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or not all(key.split(".")):
        raise ValueError(f"--set {text!r}: expected KEY=VALUE, like train.learning_rate=1e-4")
    try:
        value = read_text_yaml(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError, TypeError, RecursionError):
        value = raw  # not YAML we can build: take the text as it is
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> list[tuple[str, str]]:
    problems = []
    for text in overrides:
        try:
            keys, value = parse_override(text)
        except ValueError as e:
            problems.append(("", str(e)))
            continue
        node = raw
        for k in keys[:-1]:
            if isinstance(node.get(k), str) and k == "base_model":
                node[k] = {"name": node[k]}
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                problems.append((".".join(keys), "cannot set a key inside a non-mapping value"))
                break
        else:
            node[keys[-1]] = value
    return problems


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping safely; syntax errors become a RecipeError with line and column."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(str(path), [("", "file not found")]) from None
    except (UnicodeDecodeError, IsADirectoryError, PermissionError) as e:
        raise RecipeError(str(path), [("", f"cannot read: {e}")]) from None
    try:
        data = read_text_yaml(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise RecipeError(str(path), [("", f"YAML syntax error at {where}{e.problem or e}")]) from None
    except yaml.YAMLError as e:
        raise RecipeError(str(path), [("", f"YAML error: {e}")]) from None
    except (ValueError, TypeError) as e:  # a tagged or dated value PyYAML cannot build
        raise RecipeError(str(path), [("", f"YAML value error: {e}")]) from None
    except RecursionError:
        raise RecipeError(str(path), [("", "YAML nested too deeply")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(str(path), [("", f"a recipe is a mapping of sections, got {type(data).__name__}")])
    return data


def validate_recipe(raw: dict[str, Any], source: str, default_name: str | None = None) -> Recipe:
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(source, _problems(e)) from None
    if recipe.output.name is None:
        try:
            recipe.output.name = check_name(default_name or "adapter")
        except (ValueError, ValidationError):
            raise RecipeError(
                source, [("output.name", "the file name is not a valid adapter name; set output.name")]
            ) from None
    return recipe


def load_recipe(path: Path | str, overrides: list[str] | None = None) -> Recipe:
    """Load, override and validate a recipe file. Relative data paths resolve against its folder."""
    path = Path(path)
    raw = read_yaml(path)
    problems = apply_overrides(raw, overrides or [])
    if problems:
        raise RecipeError(str(path), problems)
    recipe = validate_recipe(raw, str(path), default_name=path.stem)
    problems = []
    for i, src in enumerate(recipe.data.sources):
        try:
            src.path = str(resolve_path(src.path, path.parent))
        except (ValueError, RuntimeError, OSError) as e:
            problems.append((f"data.sources.{i}.path", f"not a usable path: {e}"))
    if isinstance(recipe.data.eval_split, str):
        try:
            recipe.data.eval_split = str(resolve_path(recipe.data.eval_split, path.parent))
        except (ValueError, RuntimeError, OSError) as e:
            problems.append(("data.eval_split", f"not a usable path: {e}"))
    problems += tracker_problems(recipe)
    if problems:
        raise RecipeError(str(path), problems)
    return recipe


# The package each tracker needs (an import name it provides), and lorakit's pip extra for it.
TRACKER_PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"), "comet_ml": ("comet_ml", "comet"), "neptune": ("neptune", "neptune"),
    "clearml": ("clearml", "clearml"), "dvclive": ("dvclive", "dvclive"), "swanlab": ("swanlab", "swanlab"),
    "codecarbon": ("codecarbon", "codecarbon"), "dagshub": ("dagshub", "dagshub"),
    "azure_ml": ("azureml", "azure-ml"), "flyte": ("flytekit", "flyte"), "kubeflow": ("kubeflow", "kubeflow"),
}  # fmt: skip


def tracker_problems(recipe: Recipe) -> list[tuple[str, str]]:
    """train.report_to entries whose package is not installed: found before anything loads."""
    import importlib.util

    out = []
    for i, name in enumerate(recipe.train.report_to):
        module, extra = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            out.append((f"train.report_to.{i}", f"{name} is not installed; pip install 'lorakit[{extra}]'"))
    return out


def resolve_path(p: str, base: Path) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else (base / q).resolve()
