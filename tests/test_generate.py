"""Generation with several adapters on one base: each behaves exactly as when loaded alone."""

from __future__ import annotations

import pytest
import torch

from conftest import RECIPES, run_cli, tiny_recipe
from lorakit import generate
from lorakit.errors import LorakitError
from lorakit.recipe import validate_recipe
from lorakit.train import train

TIDES = RECIPES / "data" / "tides.txt"


@pytest.fixture(scope="module")
def two_adapters(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    for name, lr, seed in (("first", 2e-2, 1), ("second", 3e-2, 2)):
        body = tiny_recipe(tiny_llama, TIDES, train={"max_steps": 8, "learning_rate": lr, "seed": seed})
        body["output"] = {"name": name, "store": str(root / "adapters"), "runs_dir": str(root / "runs")}
        train(validate_recipe(body, "test"))
    return root


def logits(loaded, name, ids):
    if name:
        loaded.model.set_adapter(name)
    with torch.no_grad():
        if name is None:
            with loaded.model.disable_adapter():
                return loaded.model(input_ids=ids).logits
        return loaded.model(input_ids=ids).logits


def test_each_adapter_matches_loading_it_alone(two_adapters):
    store = two_adapters / "adapters"
    ids = torch.randint(3, 500, (1, 20), generator=torch.Generator().manual_seed(0))
    both = generate.load(store, ["first", "second"])
    assert both.adapters == ["first", "second"]
    got = {n: logits(both, n, ids) for n in ("first", "second", None)}
    for name in ("first", "second"):
        alone = generate.load(store, name)
        torch.testing.assert_close(got[name], logits(alone, name, ids))
    assert (got["first"] - got["second"]).abs().max() > 1e-3  # two different adapters
    assert (got["first"] - got[None]).abs().max() > 1e-3  # and neither is the base


def test_generate_picks_the_named_adapter(two_adapters):
    loaded = generate.load(two_adapters / "adapters", ["first", "second"])
    opts = {"max_new_tokens": 6, "temperature": 0.0}
    outs = {n: generate.generate(loaded, "At Harrow", adapter=n, **opts) for n in ("first", "second")}
    single = generate.load(two_adapters / "adapters", "second")
    assert outs["second"] == generate.generate(single, "At Harrow", **opts)
    base = generate.generate(loaded, "At Harrow", use_adapter=False, **opts)
    assert len({outs["first"], outs["second"], base}) >= 2


def test_adapters_of_different_bases_are_refused(two_adapters, tiny_gpt2):
    store = two_adapters / "adapters"
    body = tiny_recipe(tiny_gpt2, TIDES, train={"max_steps": 1})
    body["output"] = {"name": "gpt", "store": str(store), "runs_dir": str(two_adapters / "runs")}
    train(validate_recipe(body, "test"))
    with pytest.raises(LorakitError, match="different base models"):
        generate.load(store, ["first", "gpt"])


def test_cli_side_by_side(two_adapters):
    res = run_cli(
        "generate", "--adapter", "first", "--adapter", "second", "--compare", "--temperature", "0",
        "--max-new-tokens", "4", "At Harrow", cwd=two_adapters,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    order = [res.stdout.find(h) for h in ("base model", "adapter first", "adapter second")]
    assert -1 not in order and order == sorted(order), res.stdout
