"""Property tests: whatever a user writes in a recipe (or passes with --set), lorakit answers with a
Recipe or a RecipeError that lists the problems — never another exception, never a traceback.

Inputs that once escaped as other exceptions (impossible dates, mistyped tags, NUL bytes and unknown
users' `~name` in paths, deep nesting) have explicit regression tests at the end of this file.
"""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import RECIPES
from lorakit.recipe import (
    BaseModelSection,
    DataSection,
    DataSource,
    LoraSection,
    OutputSection,
    Recipe,
    RecipeError,
    TrainSection,
    load_recipe,
    validate_recipe,
)
from lorakit.recipe.load import apply_overrides
from lorakit.recipe.schema import NAME_PATTERN

pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SHIPPED = {p.stem: yaml.safe_load(p.read_text()) for p in sorted(RECIPES.glob("*.yaml"))}
SECTIONS: dict[str, type] = {
    "base_model": BaseModelSection,
    "lora": LoraSection,
    "data": DataSection,
    "train": TrainSection,
    "output": OutputSection,
}
FIELD_NAMES = sorted({*Recipe.model_fields, *(f for cls in (*SECTIONS.values(), DataSource) for f in cls.model_fields)})
DOTTED_KEYS = sorted(f"{s}.{f}" for s, cls in SECTIONS.items() for f in cls.model_fields)

SPECIAL_NUMBERS = [-1, 0, -0.0, 1, 10**30, -(10**30), 1e308, math.nan, math.inf, -math.inf, 0.5, 2**63]
SPECIAL_STRINGS = [
    "", " ", "..", "../..", "../../etc/passwd", "/", "a/b", "/abs/path.txt", "\n", "a\nb", "\t", "名前",
    "ünïcødé", "🙂", "a" * 300, "embedded:", "embedded:nope", "auto", "none", "4bit", "true", "null", "1e-4",
    "5e-2", "0x10", "[1, 2]", "{a: 1}", "x.gguf", "C:\\data\\x.txt", "-", ".", "a..b",
]  # fmt: skip


def safe_text(**kw) -> st.SearchStrategy[str]:
    return st.text(alphabet=st.characters(exclude_characters="\x00", exclude_categories=("Cs",)), **kw).filter(
        lambda s: not s.startswith("~")
    )


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    safe_text(max_size=20),
    st.sampled_from(SPECIAL_NUMBERS),
    st.sampled_from(SPECIAL_STRINGS),
)
# Keys as YAML produces them: real field names (so the values reach real validators), junk strings,
# and the non-string keys YAML allows (`1:`, `null:`, `true:`, `1.5:`).
keys = st.one_of(
    st.sampled_from(FIELD_NAMES),
    safe_text(max_size=12),
    st.integers(-5, 5),
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False, width=16),
)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4),
    max_leaves=12,
)


def plausible(cls: type, name: str) -> list[Any]:
    """Values a user might well write for this field: its default, its Literal choices, a few neighbours."""
    field = cls.model_fields[name]
    out = [] if field.is_required() else [field.get_default(call_default_factory=True)]
    for arg in (field.annotation, *getattr(field.annotation, "__args__", ())):
        if getattr(arg, "__origin__", None) is Literal:
            out += list(arg.__args__)
    out += [x for d in out if isinstance(d, int | float) and not isinstance(d, bool) for x in (d * 2, d / 2, -d)]
    return out or ["x"]


def field_values(cls: type, name: str) -> st.SearchStrategy[Any]:
    return st.one_of(*[st.sampled_from(plausible(cls, name))] * 6, values)


def section_of(cls: type) -> st.SearchStrategy[dict]:
    """A mapping with a random subset of `cls`'s fields (plausible or random values), maybe junk keys."""
    fields = {name: field_values(cls, name) for name in cls.model_fields}
    return st.builds(
        lambda known, junk: {**junk, **known},
        st.fixed_dictionaries({}, optional=fields),
        st.just({}) | st.just({}) | st.dictionaries(keys, values, min_size=1, max_size=2),
    )


structured = st.fixed_dictionaries(
    {
        "data": st.builds(
            lambda d, sources: {**d, "sources": sources},
            section_of(DataSection),
            st.lists(
                st.builds(
                    lambda src, p: {"path": p, **src}, section_of(DataSource), st.sampled_from(["d.txt"] * 4 + [1])
                ),
                min_size=1,
                max_size=3,
            )
            | values,
        ),
    },
    optional={
        "base_model": section_of(BaseModelSection) | scalars,
        "lora": section_of(LoraSection),
        "train": section_of(TrainSection),
        "output": section_of(OutputSection),
    },
)
random_recipes = st.one_of(structured, structured, st.dictionaries(keys, values, max_size=6))


def check(raw: Any, default_name: str | None = None) -> Recipe | None:
    """validate_recipe's contract: a Recipe, or a RecipeError naming at least one problem."""
    try:
        recipe = validate_recipe(raw, "x", default_name=default_name)
    except RecipeError as e:
        assert e.problems and str(e).startswith("x: ")
        return None
    assert isinstance(recipe, Recipe)
    assert NAME_PATTERN.fullmatch(recipe.adapter_name) and ".." not in recipe.adapter_name
    assert recipe.data.sources
    return recipe


@SETTINGS
@given(random_recipes)
def test_random_recipes_validate_or_raise_recipe_error(raw):
    check(raw)


# --- mutations of the shipped recipes ---------------------------------------------------------


def paths_in(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path (through dicts and lists) in a parsed recipe."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for k, v in items:
        out.append((*prefix, k))
        out += paths_in(v, (*prefix, k))
    return out


def parent_and_key(raw: Any, path: tuple) -> tuple[Any, Any]:
    node = raw
    for k in path[:-1]:
        node = node[k]
    return node, path[-1]


@st.composite
def mutated_recipes(draw) -> tuple[str, dict]:
    name = draw(st.sampled_from(sorted(SHIPPED)))
    raw = copy.deepcopy(SHIPPED[name])
    for _ in range(draw(st.integers(1, 4))):
        paths = paths_in(raw)
        op = draw(st.sampled_from(["drop", "retype", "junk", "number", "string"]))
        if not paths:
            op = "junk"
        if op == "junk":
            containers = [()] + [p for p in paths if isinstance(parent_and_key(raw, p)[0][p[-1]], dict)]
            where = draw(st.sampled_from(containers))
            node = raw
            for k in where:
                node = node[k]
            node[draw(keys)] = draw(values)
            continue
        parent, key = parent_and_key(raw, draw(st.sampled_from(paths)))
        if op == "drop":
            del parent[key]
        elif op == "retype":
            parent[key] = draw(values)
        elif op == "number":
            parent[key] = draw(st.sampled_from(SPECIAL_NUMBERS) | st.floats() | st.integers())
        else:
            parent[key] = draw(st.sampled_from(SPECIAL_STRINGS) | safe_text(max_size=30))
    return name, raw


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("properties")


@SETTINGS
@given(mutated_recipes())
def test_mutated_shipped_recipes_validate_or_raise_recipe_error(scratch, case):
    name, raw = case
    check(copy.deepcopy(raw), default_name=name)
    # The same mutation as a file: YAML round trip, relative paths resolved against the folder.
    path = scratch / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False), encoding="utf-8")
    try:
        recipe = load_recipe(path)
    except RecipeError as e:
        assert e.problems and str(e).startswith(str(path))
    else:
        assert all(Path(s.path).is_absolute() for s in recipe.data.sources)


def test_the_shipped_recipes_themselves_are_valid():
    for name, raw in SHIPPED.items():
        assert check(copy.deepcopy(raw), default_name=name) is not None, name


# --- recipe files of arbitrary bytes ----------------------------------------------------------

YAML_FRAGMENTS = [
    "data:", "  sources:", "    - path: x.txt", "  - ", "lora:", "  r: ", "base_model: ", "train:", "output:",
    "  name: ", "{", "}", "[", "]", ": ", "- ", "? ", "&a ", "*a", "<<: *a", "!!python/object:os.system ",
    "!!python/object/apply:os.system [ls]", "!!python/name:os.system ", "!!binary aGk=", "!!set {a, b}",
    "!!omap [a: 1]", "!!str 1", "!!null ''", "!custom x", "%YAML 1.1", "%TAG ! tag:x,2000:", "---", "...",
    "'quoted'", '"dq\\n"', "|", ">", "#", "\t", "\n", "  ", "2001-12-14", "2001-12-14t21:59:43.10-05:00",
    ".inf", ".nan", "-.inf", "0o17", "0x1F", "1e400", "~", "null", "yes", "no", "on", "\ufeff", "\x85", "é",
]  # fmt: skip
yaml_texts = st.lists(st.sampled_from(YAML_FRAGMENTS) | safe_text(max_size=8), max_size=30).map("".join)


@SETTINGS
@given(st.one_of(st.binary(max_size=300), yaml_texts.map(lambda s: s.encode("utf-8"))))
@example(b"data:\n  sources: !!python/object/apply:os.system [echo pwned]\n")
@example(b"\xff\xfe\x00d\x00a")
@example(b"")
@example(b"- just\n- a list\n")
@example(b"data: &a [*a]\n")
def test_recipe_files_of_arbitrary_bytes(scratch, content):
    path = scratch / "bytes.yaml"
    path.write_bytes(content)
    try:
        load_recipe(path)
    except RecipeError as e:
        assert e.problems and str(e).startswith(str(path))


# --- --set overrides --------------------------------------------------------------------------


@st.composite
def plausible_set(draw) -> str:
    section = draw(st.sampled_from(sorted(SECTIONS)))
    cls = SECTIONS[section]
    name = draw(st.sampled_from(sorted(cls.model_fields)))
    value = draw(st.sampled_from(plausible(cls, name)))
    text = yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()
    return f"{section}.{name}={text}"


set_strings = st.one_of(
    plausible_set(),
    plausible_set(),
    safe_text(max_size=40),
    st.builds(
        lambda k, sep, v: f"{k}{sep}{v}",
        st.sampled_from(DOTTED_KEYS) | st.sampled_from(FIELD_NAMES) | safe_text(max_size=15),
        st.sampled_from(["=", "==", ":", "", "= "]),
        st.sampled_from(SPECIAL_STRINGS) | st.sampled_from(YAML_FRAGMENTS) | safe_text(max_size=15)
        | st.sampled_from([str(n) for n in SPECIAL_NUMBERS]),
    ),
)  # fmt: skip


@SETTINGS
@given(st.sampled_from(sorted(SHIPPED)), st.lists(set_strings, min_size=1, max_size=4))
def test_overrides_give_a_recipe_or_recipe_error(scratch, name, overrides):
    raw = copy.deepcopy(SHIPPED[name])
    problems = apply_overrides(raw, overrides)
    assert isinstance(problems, list) and all(isinstance(p, tuple) and len(p) == 2 for p in problems)
    if not problems:
        check(raw, default_name=name)
    path = scratch / f"{name}.yaml"
    path.write_text(yaml.safe_dump(SHIPPED[name]))
    try:
        load_recipe(path, overrides)
    except RecipeError as e:
        assert e.problems and str(e).startswith(str(path))


def test_a_valid_override_takes_effect(scratch):
    path = scratch / "quickstart.yaml"
    path.write_text(yaml.safe_dump(SHIPPED["quickstart"]))
    r = load_recipe(path, ["train.learning_rate=1e-4", "base_model=gpt2", "lora.target_modules=[q_proj]"])
    assert (r.train.learning_rate, r.base_model.name, r.lora.target_modules) == (1e-4, "gpt2", ["q_proj"])


# --- the known escapes ------------------------------------------------------------------------


def _load_text(text: str, overrides: list[str] | None = None) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.yaml"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(RecipeError) as info:
            load_recipe(path, overrides)
        assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(
            "data:\n  sources: [{path: x.txt}]\ntrain:\n  seed: 2001-13-01\n",
            id="bad-date",
        ),
        pytest.param("train:\n  epochs: !!float abc\n", id="bad-float-tag"),
        pytest.param("lora:\n  r: !!int abc\n", id="bad-int-tag"),
        pytest.param("data: " + "[" * 1000 + "\n", id="deep-nesting"),
    ],
)
def test_yaml_constructor_errors_are_recipe_errors(text):
    _load_text(text)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param('data:\n  sources: [{path: "a\\0b.txt"}]\n', id="nul-in-path"),
        pytest.param(
            "data:\n  sources: [{path: ~no-such-user-lorakit/x.txt}]\n",
            id="unknown-user-home",
        ),
        pytest.param(
            'data:\n  sources: [{path: x.txt}]\n  eval_split: "e\\0.jsonl"\n',
            id="nul-in-eval-path",
        ),
    ],
)
def test_bad_data_paths_are_recipe_errors(text):
    _load_text(text)


@pytest.mark.parametrize(
    "override",
    [
        pytest.param("train.seed=2001-13-01", id="bad-date"),
        pytest.param("data.sources=" + "[" * 1000, id="deep-nesting"),
    ],
)
def test_override_values_pyyaml_cannot_construct(override):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.yaml"
        path.write_text(yaml.safe_dump(SHIPPED["quickstart"]))
        with pytest.raises(RecipeError) as info:
            load_recipe(path, [override])
        key = override.partition("=")[0]
        assert any(key in loc or key in msg for loc, msg in info.value.problems), info.value.problems
