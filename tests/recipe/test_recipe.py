"""Recipe loading and validation: defaults, paths, every problem at its key path, overrides, schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import RECIPES, run_cli, write_recipe
from lorakit.recipe import (
    EMBEDDED_DEFAULT,
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
from lorakit.recipe.reference import recipe_json_schema, reference_markdown

SOURCES = {"sources": [{"path": "data.txt"}]}
MINIMAL = {"data": SOURCES}


def problems_of(raw: dict) -> dict[str, str]:
    with pytest.raises(RecipeError) as info:
        validate_recipe(raw, "r.yaml", default_name="r")
    return dict(info.value.problems)


def load_problems(path: Path, overrides: list[str] | None = None) -> list[tuple[str, str]]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return info.value.problems


# --- defaults and paths -----------------------------------------------------------------------


def test_minimal_recipe_gets_every_default(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    folder.mkdir()
    path = write_recipe(
        folder, {"data": {"sources": [{"path": "data/notes.txt"}, {"path": "/abs/x.jsonl"}]}}, "my-run.yaml"
    )
    monkeypatch.chdir(tmp_path)  # relative paths follow the recipe file, not the working dir
    r = load_recipe(Path("recipes/my-run.yaml"))

    assert r.base_model.name == EMBEDDED_DEFAULT
    assert (r.base_model.dtype, r.base_model.quantization, r.base_model.revision) == ("auto", "none", None)
    assert r.base_model.trust_remote_code is False
    assert (r.lora.r, r.lora.alpha, r.lora.dropout, r.lora.target_modules) == (16, None, 0.0, "auto")
    assert (r.lora.bias, r.lora.use_dora, r.lora.modules_to_save) == ("none", False, [])
    assert (r.data.eval_split, r.data.block_size, r.data.packing) == (0.1, 512, True)
    src = r.data.sources[0]
    assert (src.format, src.field, src.split, src.weight) == ("text", None, "file", 1.0)
    assert (r.train.epochs, r.train.max_steps, r.train.learning_rate) == (1.0, None, "auto")
    assert (r.train.batch_size, r.train.seed, r.train.precision) == (4, 42, "auto")
    assert (r.output.name, r.output.store, r.output.runs_dir) == ("my-run", "adapters", "runs")
    assert r.adapter_name == "my-run"
    assert src.path == str((folder / "data" / "notes.txt").resolve())
    assert r.data.sources[1].path == "/abs/x.jsonl"
    assert path.exists()


def test_eval_split_path_resolves_against_the_recipe_folder(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    path = write_recipe(sub, {"data": {**SOURCES, "eval_split": "held/eval.jsonl"}})
    assert load_recipe(path).data.eval_split == str((sub / "held" / "eval.jsonl").resolve())


def test_base_model_shorthand_string(tmp_path):
    r = load_recipe(write_recipe(tmp_path, {"base_model": "gpt2", **MINIMAL}))
    assert r.base_model.name == "gpt2"
    assert r.base_model.dtype == "auto"


def test_empty_recipe_file_reports_missing_data(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing yet\n")
    assert load_problems(path) == [("data", "required key is missing")]


# --- problems ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "key", "hint"),
    [
        ({**MINIMAL, "lora": {"rr": 8}}, "lora.rr", "did you mean 'r'?"),
        ({**MINIMAL, "trian": {}}, "trian", "did you mean 'train'?"),
        ({**MINIMAL, "base_model": {"nme": "gpt2"}}, "base_model.nme", "did you mean 'name'?"),
        ({"data": {"sources": [{"path": "x", "formt": "chat"}]}}, "data.sources.0.formt", "'format'"),
        ({**MINIMAL, "zzz": 1}, "zzz", "known keys: base_model, lora, data, train, output"),
    ],
)
def test_unknown_key_reported_at_its_path_with_a_suggestion(raw, key, hint):
    problems = problems_of(raw)
    assert list(problems) == [key]
    assert problems[key].startswith("unknown key")
    assert hint in problems[key]


def test_several_problems_reported_at_once():
    raw = {**MINIMAL, "lora": {"rr": 8, "r": 0}, "bogus": 1, "train": {"learning_rate": -1e-3}}
    with pytest.raises(RecipeError) as info:
        validate_recipe(raw, "r.yaml")
    err = info.value
    assert {loc for loc, _ in err.problems} == {"lora.rr", "lora.r", "bogus", "train.learning_rate"}
    lines = err.render().splitlines()
    assert lines[0] == "r.yaml: 4 problems"
    assert len(lines) == 5
    assert "  lora.rr: unknown key (did you mean 'r'?)" in lines
    assert str(err) == err.render()


def test_single_problem_is_singular():
    err = RecipeError("x.yaml", [("lora.r", "bad")])
    assert err.render() == "x.yaml: 1 problem\n  lora.r: bad"
    assert RecipeError("x.yaml", [("", "whole file")]).render() == "x.yaml: 1 problem\n  whole file"


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("lora", "r", 0, "greater than 0, got 0"),
        ("lora", "r", -1, "greater than 0, got -1"),
        ("lora", "r", 2.5, "valid integer, got 2.5"),
        ("lora", "alpha", 0, "greater than 0"),
        ("train", "learning_rate", 0, "number in (0, 1), got 0"),
        ("train", "learning_rate", -1e-3, "number in (0, 1), got -0.001"),
        ("lora", "dropout", 1.0, "less than 1, got 1.0"),
        ("lora", "dropout", -0.1, "greater than or equal to 0, got -0.1"),
        ("lora", "target_modules", [], "at least one module"),
        ("lora", "target_modules", "bogus", "'auto' or 'all-linear'"),
        ("data", "block_size", 4, "greater than or equal to 8, got 4"),
        ("data", "eval_split", 0.9, "a fraction must be in [0, 0.5]"),
        ("data", "eval_split", -0.1, "a fraction must be in [0, 0.5]"),
        ("data", "sources", [], "at least 1 item"),
        ("base_model", "dtype", "fp8", "'auto', 'float32', 'bfloat16' or 'float16'"),
        ("train", "batch_size", 0, "greater than 0"),
    ],
)
def test_bad_value_reported_at_its_key_path(section, key, value, expected):
    raw = {"data": dict(SOURCES)}
    raw.setdefault(section, {})[key] = value
    problems = problems_of(raw)
    assert list(problems) == [f"{section}.{key}"]
    assert expected in problems[f"{section}.{key}"]


@pytest.mark.parametrize("value", [0.0, 0.5, 0])
def test_eval_split_bounds_are_inclusive(value):
    assert validate_recipe({"data": {**SOURCES, "eval_split": value}}, "r").data.eval_split == value


@pytest.mark.parametrize(
    "raw",
    [{"lora": {"r": 4}}, {"data": None}, {"data": {"block_size": 64}}],
    ids=["no-data", "data-null", "no-sources"],
)
def test_missing_data_section(raw):
    problems = problems_of(raw)
    assert len(problems) == 1
    loc, msg = next(iter(problems.items()))
    assert loc in {"data", "data.sources"}
    assert "missing" in msg or "valid dictionary" in msg


@pytest.mark.parametrize(
    ("sections", "needle"),
    [
        (
            {
                "base_model": {"quantization": "4bit", "dtype": "float16"},
                "train": {"precision": "bf16"},
            },
            "train.precision bf16 with base_model.dtype float16",
        ),
        ({"base_model": {"quantization": "8bit"}, "lora": {"use_dora": True}}, "use_dora is not supported"),
    ],
)
def test_cross_field_problems(sections, needle):
    problems = problems_of({**MINIMAL, **sections})
    assert list(problems) == [""]
    assert needle in problems[""]


@pytest.mark.parametrize(
    ("section", "key", "value", "shown"),
    [("data", "eval_split", 0.9, "got 0.9"), ("output", "name", "../x", "'../x'")],
)
def test_value_is_shown_once_in_a_problem(section, key, value, shown):
    raw = {"data": dict(SOURCES)}
    raw.setdefault(section, {})[key] = value
    msg = problems_of(raw)[f"{section}.{key}"]
    assert msg.count(shown) == 1, msg


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({**MINIMAL, "float": 1}, "float"),
        ({**MINIMAL, "modules[0]": "q_proj"}, "modules[0]"),
        ({**MINIMAL, "lora": {"str": 1}}, "lora.str"),
        ({**MINIMAL, "lora": {"target_modules[0]": "q_proj"}}, "lora.target_modules[0]"),
    ],
)
def test_unknown_key_named_like_a_union_tag(raw, key):
    try:
        problems = problems_of(raw)
    except IndexError as e:
        raise AssertionError(f"crashed: {e!r}") from None
    assert list(problems) == [key]
    assert problems[key].startswith("unknown key")


# --- YAML -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("lora:\n  r: 4\n\tdropout: 0.1\n", "line 3, column 1"),
        ("data:\n  sources:\n    - path: x\n  block_size: 8\n   packing: true\n", "line 5, column 11"),
        ("lora:\n  r: 4\n  dropout: [0.1\ntrain: {}\n", "line 4, column 6"),
    ],
)
def test_malformed_yaml_is_one_problem_with_line_and_column(tmp_path, text, where):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    problems = load_problems(path)
    assert len(problems) == 1
    assert problems[0][0] == ""
    assert f"YAML syntax error at {where}:" in problems[0][1]


def test_python_tags_are_rejected_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"lora: !!python/object/apply:os.system ['touch {marker}']\n")
    problems = load_problems(path)
    assert len(problems) == 1
    assert "python/object/apply:os.system" in problems[0][1]
    assert not marker.exists()


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("just a string\n", "str"), ("3\n", "int")])
def test_top_level_must_be_a_mapping(tmp_path, text, kind):
    path = tmp_path / "list.yaml"
    path.write_text(text)
    assert load_problems(path) == [("", f"a recipe is a mapping of sections, got {kind}")]


def test_missing_file(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "nope.yaml")
    assert info.value.source == str(tmp_path / "nope.yaml")
    assert info.value.problems == [("", "file not found")]


def test_recipe_path_that_is_a_folder(tmp_path):
    problems = load_problems(tmp_path)
    assert problems[0][1].startswith("cannot read:")


# --- overrides --------------------------------------------------------------------------------


def test_overrides_are_parsed_as_yaml_and_applied(tmp_path):
    path = write_recipe(tmp_path, {"base_model": "gpt2", **MINIMAL, "lora": {"r": 8}})
    r = load_recipe(
        path,
        [
            "train.learning_rate=1e-4",
            "lora.target_modules=[q_proj,v_proj]",
            "base_model.name=sshleifer/tiny-gpt2",
            "lora.use_dora=true",
            "output.name=other",
        ],
    )
    assert r.train.learning_rate == 1e-4
    assert isinstance(r.train.learning_rate, float)
    assert r.lora.target_modules == ["q_proj", "v_proj"]
    assert r.base_model.name == "sshleifer/tiny-gpt2"
    assert r.lora.use_dora is True
    assert r.lora.r == 8  # untouched keys of an overridden section stay
    assert r.adapter_name == "other"


def test_override_creates_missing_sections(tmp_path):
    r = load_recipe(write_recipe(tmp_path, MINIMAL), ["train.seed=7", "base_model.dtype=float32"])
    assert (r.train.seed, r.base_model.dtype, r.base_model.name) == (7, "float32", EMBEDDED_DEFAULT)


@pytest.mark.parametrize("text", ["foo", "=3", "lora..r=3", ".r=1", "lora.=1"])
def test_malformed_override(tmp_path, text):
    problems = load_problems(write_recipe(tmp_path, MINIMAL), [text])
    assert len(problems) == 1
    assert "expected KEY=VALUE" in problems[0][1]
    assert repr(text) in problems[0][1]


@pytest.mark.parametrize(
    ("override", "key", "needle"),
    [
        ("lora.r=-2", "lora.r", "greater than 0, got -2"),
        ("lora.r=abc", "lora.r", "valid integer"),
        ("lora.target_modules=[q_proj", "lora.target_modules", "'auto' or 'all-linear'"),
        ("lora.rr=4", "lora.rr", "did you mean 'r'?"),
        ("output.name=", "output.name", "invalid adapter name ''"),
    ],
)
def test_override_with_invalid_value(tmp_path, override, key, needle):
    problems = dict(load_problems(write_recipe(tmp_path, MINIMAL), [override]))
    assert list(problems) == [key]
    assert needle in problems[key]


def test_override_inside_a_scalar(tmp_path):
    path = write_recipe(tmp_path, {**MINIMAL, "lora": {"r": 4}})
    assert load_problems(path, ["lora.r.x=1"]) == [("lora.r.x", "cannot set a key inside a non-mapping value")]


def test_eval_split_in_exponent_notation_is_a_fraction(tmp_path):
    r = load_recipe(write_recipe(tmp_path, MINIMAL), ["data.eval_split=5e-2"])
    assert r.data.eval_split == 0.05


# --- adapter names ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "", ".hidden", "a..b", "-x", "x" * 65, "a b"])
def test_bad_adapter_names_rejected(tmp_path, name):
    problems = dict(load_problems(write_recipe(tmp_path, {**MINIMAL, "output": {"name": name}})))
    assert list(problems) == ["output.name"]
    assert f"invalid adapter name {name!r}" in problems["output.name"]


@pytest.mark.parametrize("name", ["good-name_1.0", "A", "x" * 64, "v2.1"])
def test_good_adapter_names_accepted(tmp_path, name):
    assert load_recipe(write_recipe(tmp_path, {**MINIMAL, "output": {"name": name}})).adapter_name == name


@pytest.mark.parametrize("stem", ["bad name!", "-dash", "x" * 70])
def test_file_stem_that_is_no_adapter_name(tmp_path, stem):
    path = write_recipe(tmp_path, MINIMAL, f"{stem}.yaml")
    assert load_problems(path) == [("output.name", "the file name is not a valid adapter name; set output.name")]
    # ...and setting output.name fixes it
    assert load_recipe(path, ["output.name=fine"]).adapter_name == "fine"


# --- shipped recipes --------------------------------------------------------------------------

SHIPPED = sorted(RECIPES.glob("*.yaml"))


def test_there_are_shipped_recipes():
    assert len(SHIPPED) >= 1


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_recipe_validates(path):
    r = load_recipe(path)
    assert r.adapter_name
    for src in r.data.sources:
        assert Path(src.path).exists(), src.path


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_recipes_rely_on_the_automatic_learning_rate(path):
    """A shipped recipe that sets a learning rate says why, in a comment on that line."""
    lines = [line for line in path.read_text().splitlines() if line.strip().startswith("learning_rate:")]
    assert all("#" in line for line in lines), lines
    if not lines:
        assert load_recipe(path).train.learning_rate == "auto"


# --- schema and reference ---------------------------------------------------------------------


def _refs(node):
    if isinstance(node, dict):
        if "$ref" in node:
            yield node["$ref"]
        for v in node.values():
            yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def _accepted_types(schema: dict, node: dict) -> set[str]:
    if "$ref" in node:
        node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    types = {node["type"]} if "type" in node else set()
    for key in ("anyOf", "oneOf"):
        for sub in node.get(key, []):
            types |= _accepted_types(schema, sub)
    return types


def test_json_schema_structure():
    schema = json.loads(json.dumps(recipe_json_schema()))  # serialisable
    assert schema["type"] == "object"
    assert schema["title"] == "lorakit recipe"
    assert set(schema["properties"]) == {"base_model", "lora", "data", "train", "output"}
    assert schema["required"] == ["data"]
    assert schema["additionalProperties"] is False
    defs = schema["$defs"]
    for name in ("LoraSection", "DataSection", "DataSource", "TrainSection", "OutputSection"):
        assert defs[name]["additionalProperties"] is False
    assert set(defs["LoraSection"]["properties"]) == set(LoraSection.model_fields)
    assert defs["LoraSection"]["properties"]["r"]["exclusiveMinimum"] == 0
    for ref in _refs(schema):
        assert ref.startswith("#/$defs/")
        assert ref.removeprefix("#/$defs/") in defs


def test_json_schema_validates_a_good_recipe_and_rejects_a_typo():
    jsonschema = pytest.importorskip("jsonschema")
    schema = recipe_json_schema()
    jsonschema.validators.validator_for(schema).check_schema(schema)
    good = {
        "base_model": {"name": "gpt2", "dtype": "float32"},
        "lora": {"r": 8, "target_modules": ["c_attn"]},
        "data": {"sources": [{"path": "d.jsonl", "format": "chat"}], "eval_split": 0.1},
        "train": {"max_steps": 10},
        "output": {"name": "x"},
    }
    jsonschema.validate(good, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**good, "lora": {"rr": 8}}, schema)


def test_json_schema_accepts_base_model_shorthand():
    schema = recipe_json_schema()
    assert "string" in _accepted_types(schema, schema["properties"]["base_model"])


SECTIONS = {
    "base_model": BaseModelSection,
    "lora": LoraSection,
    "data": DataSection,
    "data.sources[]": DataSource,
    "train": TrainSection,
    "output": OutputSection,
}


def test_reference_lists_every_field():
    text = reference_markdown()
    keys = [line.split("`")[1] for line in text.splitlines()[2:]]
    expected = {f"{prefix}.{name}" for prefix, cls in SECTIONS.items() for name in cls.model_fields}
    expected.discard("data.sources")  # documented through its data.sources[].* rows
    assert set(keys) == expected
    assert len(keys) == len(set(keys))
    assert set(Recipe.model_fields) == {p.split(".")[0] for p in SECTIONS}
    row = {line.split("`")[1]: line for line in text.splitlines()[2:]}
    assert "| `16` | LoRA rank. |" in row["lora.r"]
    assert "`required`" in row["data.sources[].path"]


def test_reference_rows_have_four_cells():
    for line in reference_markdown().splitlines():
        cells = line.replace("\\|", "").strip("|").split("|")
        assert len(cells) == 4, line


# --- CLI --------------------------------------------------------------------------------------


def test_cli_validate_good_recipe(tmp_path):
    write_recipe(tmp_path, {**MINIMAL, "output": {"name": "fine"}}, "good.yaml")
    res = run_cli("recipe", "validate", "good.yaml", cwd=tmp_path, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "ok" in res.stdout
    assert "'fine'" in res.stdout


def test_cli_validate_bad_recipe(tmp_path):
    write_recipe(tmp_path, {**MINIMAL, "output": {"name": "fine"}}, "good.yaml")
    write_recipe(tmp_path, {"data": SOURCES, "lora": {"rr": 8, "r": 0}}, "bad.yaml")
    res = run_cli("recipe", "validate", "good.yaml", "bad.yaml", cwd=tmp_path, timeout=60)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr + res.stdout
    assert "bad.yaml: 2 problems" in res.stderr
    assert "lora.rr: unknown key (did you mean 'r'?)" in res.stderr
    assert "lora.r: Input should be greater than 0" in res.stderr
    assert "ok good.yaml" in res.stdout


def test_cli_schema_prints_json(tmp_path):
    res = run_cli("recipe", "schema", cwd=tmp_path, timeout=60)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == json.loads(json.dumps(recipe_json_schema()))


@pytest.mark.parametrize(("text", "want"), [("on", "on"), ("off", "off"), ("true", "on"), ("auto", "auto")])
def test_gradient_checkpointing_accepts_yaml_on_off(tmp_path, text, want):
    path = tmp_path / "r.yaml"
    path.write_text(f"data:\n  sources: [{{path: x.txt}}]\ntrain:\n  gradient_checkpointing: {text}\n")
    assert load_recipe(path).train.gradient_checkpointing == want
    assert load_recipe(path, [f"train.gradient_checkpointing={text}"]).train.gradient_checkpointing == want
