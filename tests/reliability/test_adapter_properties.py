"""Property tests: whatever an adapter folder holds (random or mutated lorakit.json and adapter_config.json, damaged or
foreign weights), `adapters list` lists the store, `adapters show` shows it or says why not, and loading it for
generation gives the model or a LorakitError: never another exception."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import one_step_adapter
from lorakit.cli import app
from lorakit.errors import LorakitError
from lorakit.store.adapters import list_adapters
from lorakit.store.loader import load

FILES = ("lorakit.json", "adapter_config.json")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into a JSON value."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += paths(v, (*prefix, k))
    return out


def replaced(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    return {**value, path[0]: replaced(value[path[0]], path[1:], new)}


@st.composite
def mutations(draw, original: dict) -> dict:
    """`original` with a few values, anywhere in it, replaced by random JSON (or the whole file by random JSON)."""
    if draw(st.booleans()) and draw(st.booleans()):
        return draw(json_values)
    doc = original
    for _ in range(draw(st.integers(1, 3))):
        doc = replaced(doc, draw(st.sampled_from(paths(doc))), draw(json_values))
    return doc


@pytest.fixture(scope="module")
def source(tiny_llama, tmp_path_factory):
    good = one_step_adapter(tiny_llama, tmp_path_factory.mktemp("adapter-properties"))
    return good, {f: json.loads((good / f).read_text()) for f in FILES}


def weights_variants(good: Path) -> st.SearchStrategy:
    real = (good / "adapter_model.safetensors").read_bytes()
    foreign = st.dictionaries(
        st.text("abcdefghijklmnopqrstuvwxyz._AB", min_size=1, max_size=40),
        st.lists(st.integers(1, 6), min_size=1, max_size=3),
        min_size=1,
        max_size=4,
    )
    return st.one_of(
        st.just(("real", real)),
        st.integers(0, len(real) - 1).map(lambda n: ("truncated", real[:n])),
        st.binary(max_size=64).map(lambda b: ("bytes", b)),
        foreign.map(lambda shapes: ("foreign", shapes)),
    )


def write_folder(store: Path, good: Path, docs: dict, weights: tuple) -> str:
    folder = store / "x"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(good, folder)
    for name, doc in docs.items():
        (folder / name).write_text(doc if isinstance(doc, str) else json.dumps(doc))
    kind, payload = weights
    if kind == "foreign":
        save_file({k: torch.zeros(shape) for k, shape in payload.items()}, folder / "adapter_model.safetensors")
    else:
        (folder / "adapter_model.safetensors").write_bytes(payload)
    return "x"


def folder_cases(source):
    good, originals = source
    docs = st.fixed_dictionaries(
        {f: st.one_of(mutations(originals[f]), st.text(max_size=30), st.just(originals[f])) for f in FILES}
    )
    return st.tuples(docs, weights_variants(good))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("random-store")


def test_list_and_show_never_raise_anything_else(source, store):
    runner = CliRunner()

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(folder_cases(source))
    def check(case):
        docs, weights = case
        name = write_folder(store, source[0], docs, weights)
        rows = list_adapters(store)  # never raises for one bad adapter
        assert [r["name"] for r in rows] == [name]
        for args in (["adapters", "list", "--store", str(store)], ["adapters", "show", name, "--store", str(store)]):
            res = runner.invoke(app, args)
            assert res.exit_code in (0, 2), (args, res.output, res.exception)
            assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)

    check()


def test_loading_for_generation_gives_the_model_or_a_lorakit_error(source, store):
    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
    @given(folder_cases(source))
    def check(case):
        docs, weights = case
        name = write_folder(store, source[0], docs, weights)
        try:
            loaded = load(store, name)
        except LorakitError:
            return
        assert loaded.adapter == name  # loaded: then its tensors fit the base

    check()
