"""`lorakit recipe schema` and `lorakit recipe validate` give every recipe the same verdict: editors that check
recipes against the schema accept exactly what lorakit accepts."""

from __future__ import annotations

import copy

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from conftest import RECIPES
from lorakit.recipe import RecipeError, validate_recipe
from lorakit.recipe.load import read_text_yaml
from lorakit.recipe.reference import recipe_json_schema

SCHEMA = recipe_json_schema()
VALIDATOR = Draft202012Validator(SCHEMA)
BASE = {"data": {"sources": [{"path": "data/tides.txt"}]}}
SHIPPED = [yaml.safe_load(p.read_text()) for p in sorted(RECIPES.glob("*.yaml"))]


def with_(path: str, value) -> dict:
    recipe = copy.deepcopy(BASE)
    node = recipe
    *keys, last = path.split(".")
    for k in keys:
        node = node.setdefault(k, {})
    node[last] = value
    return recipe


def verdicts(recipe) -> tuple[bool, bool]:
    schema_ok = VALIDATOR.is_valid(recipe)
    try:
        validate_recipe(recipe, "test", "adapter")
        lorakit_ok = True
    except RecipeError:
        lorakit_ok = False
    return schema_ok, lorakit_ok


CASES = {
    # the two disagreements that were reported
    "eval_split 0.7": (with_("data.eval_split", 0.7), False),
    'r "16"': (with_("lora.r", "16"), False),
    # numbers and their bounds
    "r 16": (with_("lora.r", 16), True),
    "r 16.0 (a whole float)": (with_("lora.r", 16.0), True),
    "r 16.5": (with_("lora.r", 16.5), False),
    "r true": (with_("lora.r", True), False),
    "r 0": (with_("lora.r", 0), False),
    "learning_rate auto": (with_("train.learning_rate", "auto"), True),
    "learning_rate 2e-4": (with_("train.learning_rate", 2e-4), True),
    'learning_rate "2e-4" (quoted)': (with_("train.learning_rate", "2e-4"), False),
    "learning_rate 0": (with_("train.learning_rate", 0), False),
    "learning_rate 1": (with_("train.learning_rate", 1), False),
    "learning_rate fast": (with_("train.learning_rate", "fast"), False),
    "eval_split 0.5": (with_("data.eval_split", 0.5), True),
    "eval_split 0": (with_("data.eval_split", 0), True),
    "eval_split -0.1": (with_("data.eval_split", -0.1), False),
    "eval_split a file": (with_("data.eval_split", "eval.txt"), True),
    "seed 2^32-1": (with_("train.seed", 2**32 - 1), True),
    "seed 2^32": (with_("train.seed", 2**32), False),
    "epochs 0": (with_("train.epochs", 0), False),
    "dropout 1": (with_("lora.dropout", 1), False),
    "block_size 7": (with_("data.block_size", 7), False),
    "weight 0": (with_("data.sources", [{"path": "a.txt", "weight": 0}]), False),
    # choices, lists, names
    "gradient_checkpointing on": (with_("train.gradient_checkpointing", "on"), True),
    "gradient_checkpointing true (YAML's on)": (with_("train.gradient_checkpointing", True), True),
    "gradient_checkpointing maybe": (with_("train.gradient_checkpointing", "maybe"), False),
    "quantization 3bit": (with_("base_model.quantization", "3bit"), False),
    "target_modules []": (with_("lora.target_modules", []), False),
    "target_modules [q_proj]": (with_("lora.target_modules", ["q_proj"]), True),
    "packing yes (a string)": (with_("data.packing", "yes"), False),
    "output.name ok": (with_("output.name", "my-adapter.v2"), True),
    "output.name ../up": (with_("output.name", "../up"), False),
    "output.name a..b": (with_("output.name", "a..b"), False),
    "base_model shorthand": ({**BASE, "base_model": "gpt2"}, True),
    "unknown key": (with_("lora.rr", 8), False),
    "no data": ({"lora": {"r": 8}}, False),
    "no sources": (with_("data.sources", []), False),
    # the validator's cross-field rules
    "4bit + float16 + bf16": (
        {**BASE, "base_model": {"quantization": "4bit", "dtype": "float16"}, "train": {"precision": "bf16"}},
        False,
    ),
    "4bit + float16 + fp16": (
        {**BASE, "base_model": {"quantization": "4bit", "dtype": "float16"}, "train": {"precision": "fp16"}},
        True,
    ),
    "DoRA + 8bit": ({**BASE, "base_model": {"quantization": "8bit"}, "lora": {"use_dora": True}}, False),
    "DoRA + 4bit": ({**BASE, "base_model": {"quantization": "4bit"}, "lora": {"use_dora": True}}, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_schema_and_validator_agree(case):
    recipe, valid = CASES[case]
    assert verdicts(recipe) == (valid, valid)


def test_the_schema_says_which_draft_it_is():
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(SCHEMA)


def test_recipes_read_1e_3_as_a_number_as_yaml_1_2_does():
    assert read_text_yaml("lr: 1e-3\nn: 5E+2\nname: 1e3x\nquoted: '1e-3'\n") == {
        "lr": 1e-3,
        "n": 500.0,
        "name": "1e3x",
        "quoted": "1e-3",
    }


json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 2**33),
    st.floats(-2, 5000, allow_nan=False, allow_infinity=False),
    st.sampled_from(["auto", "on", "off", "4bit", "none", "chat", "x", "16", "0.1", "a..b", "all-linear"]),
    st.lists(st.sampled_from(["q_proj", "v_proj", 3]), max_size=2),
)


def leaf_paths(value, prefix=()) -> list[tuple]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in leaf_paths(v, (*prefix, k))]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [p for i, v in enumerate(value) for p in leaf_paths(v, (*prefix, i))]
    return [prefix]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SHIPPED), st.data())
def test_mutated_shipped_recipes_get_the_same_verdict(recipe, data):
    recipe = copy.deepcopy(recipe)
    for _ in range(data.draw(st.integers(1, 2))):
        *keys, last = data.draw(st.sampled_from(leaf_paths(recipe)))
        node = recipe
        for k in keys:
            node = node[k]
        node[last] = data.draw(json_leaf)
    schema_ok, lorakit_ok = verdicts(recipe)
    assert schema_ok == lorakit_ok, (recipe, list(VALIDATOR.iter_errors(recipe))[:1])
