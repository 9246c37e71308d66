"""Combining adapters of one base: every method equals peft's own `add_weighted_adapter` result.

Two adapters are trained on different data (tide tables, lighthouse logs) on the tiny models; the
reference is plain PEFT loading both and calling `add_weighted_adapter` with the same arguments.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import RECIPES, logits, quiet, read_meta, run_cli, trained
from lorakit.deploy.combine import combine_adapters
from lorakit.errors import LorakitError

LIGHTHOUSE = RECIPES / "data" / "lighthouse"


@pytest.fixture(scope="module")
def llama_pair(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pair")
    trained(tiny_llama, tmp, "tides", lora={"r": 4})
    trained(tiny_llama, tmp, "logs", data=LIGHTHOUSE, lora={"r": 4}, train={"seed": 7})
    trained(tiny_llama, tmp, "wide", lora={"r": 8})
    return tmp / "adapters"


@pytest.fixture(scope="module")
def gpt2_pair(tiny_gpt2, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpt2-pair")
    trained(tiny_gpt2, tmp, "tides")
    trained(tiny_gpt2, tmp, "logs", data=LIGHTHOUSE)
    return tmp / "adapters"


def peft_reference(base_dir, store, names, weights, method, density=None, seed=0):
    """What a peft user gets: both adapters on the base, add_weighted_adapter, the new adapter's state."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(store / names[0]), "a0")
    for i, n in enumerate(names[1:], 1):
        model.load_adapter(str(store / n), adapter_name=f"a{i}")
    torch.manual_seed(seed)
    model.add_weighted_adapter([f"a{i}" for i in range(len(names))], weights, "mix", method, density=density)
    model.set_adapter("mix")
    state = {k: v.clone() for k, v in get_peft_model_state_dict(model, adapter_name="mix").items()}
    return state, logits(model.eval())


def written(store, name):
    return load_file(str(store / name / "adapter_model.safetensors"))


@pytest.mark.parametrize(
    "method,density",
    [
        ("linear", None),
        ("cat", None),
        ("svd", None),
        ("ties", 0.5),
        ("dare_linear", 0.5),
        ("dare_ties", 0.7),
        ("magnitude_prune", 0.5),
        ("ties_svd", 0.5),
    ],
)
def test_every_method_equals_peft(llama_pair, tiny_llama, method, density):
    weights = [0.7, 0.3]
    report = combine_adapters(
        llama_pair, ["tides", "logs"], f"mix-{method}", weights, method, density, seed=3, say=quiet
    )
    state, ref_logits = peft_reference(tiny_llama, llama_pair, ["tides", "logs"], weights, method, density, seed=3)
    got = written(llama_pair, f"mix-{method}")
    assert sorted(got) == sorted(state)
    for key, value in state.items():
        torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-7, msg=key)
    # and plain PEFT loading what lorakit wrote gives the reference logits
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(report.path)).eval()
    torch.testing.assert_close(logits(plain), ref_logits, rtol=1e-5, atol=1e-6)
    meta = read_meta(llama_pair, f"mix-{method}")
    assert meta["combined"]["weights"] == {"tides": 0.7, "logs": 0.3}
    assert meta["combined"]["method"] == method


def test_cat_is_the_exact_weighted_sum_and_linear_is_not(llama_pair):
    cat = combine_adapters(llama_pair, ["tides", "logs"], "c", [0.6, 0.4], "cat", say=quiet)
    lin = combine_adapters(llama_pair, ["tides", "logs"], "l", [0.6, 0.4], "linear", say=quiet)
    assert cat.relative_to_exact < 1e-6
    assert cat.r == 8  # ranks add up
    assert lin.relative_to_exact > 1e-3  # combining A and B separately is not Σ wᵢ·ΔWᵢ
    assert cat.layers == lin.layers > 0


def test_cat_and_svd_accept_different_ranks(llama_pair, tiny_llama):
    cat = combine_adapters(llama_pair, ["tides", "wide"], "tw", [0.5, 0.5], "cat", say=quiet)
    assert cat.r == 12
    svd = combine_adapters(llama_pair, ["tides", "wide"], "tw-svd", [0.5, 0.5], "svd", say=quiet)
    assert svd.r == 8  # the largest rank, by default
    # at rank 12 = the sum of the ranks, the SVD re-factorization loses nothing
    full = combine_adapters(llama_pair, ["tides", "wide"], "tw-12", [0.5, 0.5], "svd", svd_rank=12, say=quiet)
    assert full.relative_to_exact < 1e-4 < svd.relative_to_exact


def test_conv1d_gpt2(gpt2_pair, tiny_gpt2):
    for method in ("cat", "svd"):
        combine_adapters(gpt2_pair, ["tides", "logs"], method, [1.0, -0.5], method, say=quiet)
        state, ref = peft_reference(tiny_gpt2, gpt2_pair, ["tides", "logs"], [1.0, -0.5], method)
        for key, value in state.items():
            torch.testing.assert_close(written(gpt2_pair, method)[key], value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "names,weights,method,density,message",
    [
        (["tides"], None, "cat", None, "at least two adapters"),
        (["tides", "tides"], None, "cat", None, "named twice"),
        (["tides", "logs"], [1.0], "cat", None, "2 adapters but 1 weights"),
        (["tides", "logs"], None, "ties", None, "needs --density"),
        (["tides", "logs"], None, "ties", 1.5, "in (0, 1]"),
        (["tides", "logs"], None, "cat", 0.5, "--density applies to"),
        (["tides", "logs"], None, "average", None, "--method must be one of"),
        (["tides", "logs"], [0.0, 0.0], "cat", None, "all weights are 0"),
        (["tides", "wide"], None, "linear", None, "same rank (tides: r=4, wide: r=8); use cat or svd"),
        (["tides", "missing"], None, "cat", None, "no adapter 'missing'"),
    ],
)
def test_bad_requests_are_refused_and_write_nothing(llama_pair, names, weights, method, density, message):
    before = sorted(p.name for p in llama_pair.iterdir())
    with pytest.raises(LorakitError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        combine_adapters(llama_pair, names, "nope", weights, method, density, say=quiet)
    assert sorted(p.name for p in llama_pair.iterdir()) == before


def test_refuses_different_bases_and_existing_target(llama_pair, gpt2_pair, tmp_path):
    import shutil

    shutil.copytree(gpt2_pair / "tides", llama_pair / "g-tides")
    try:
        with pytest.raises(LorakitError, match="same base model"):
            combine_adapters(llama_pair, ["tides", "g-tides"], "x", method="cat", say=quiet)
    finally:
        shutil.rmtree(llama_pair / "g-tides")
    with pytest.raises(LorakitError, match="already exists"):
        combine_adapters(llama_pair, ["tides", "logs"], "wide", method="cat", say=quiet)


def test_cli_combines_into_adapter_and_into_a_merged_model(llama_pair, tiny_llama, tmp_path):
    cwd = llama_pair.parent
    r = run_cli(
        "merge", "tides", "logs", "--weights", "0.7", "0.3", "--method", "cat", "--into-adapter", "mixed",
        "--store", str(llama_pair), cwd=cwd,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "wrote adapter mixed" in r.stdout and "relative difference" in r.stdout
    assert read_meta(llama_pair, "mixed")["combined"]["weights"] == {"tides": 0.7, "logs": 0.3}
    state, ref = peft_reference(tiny_llama, llama_pair, ["tides", "logs"], [0.7, 0.3], "cat")
    for key, value in state.items():
        torch.testing.assert_close(written(llama_pair, "mixed")[key], value, rtol=1e-6, atol=1e-7)

    out = tmp_path / "merged"
    r = run_cli(
        "merge", "tides", "logs", "--weights", "0.7,0.3", "--out", str(out), "--store", str(llama_pair), cwd=cwd
    )
    assert r.returncode == 0, r.stderr
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out).eval()), ref, rtol=1e-4, atol=1e-5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the scratch store is gone

    r = run_cli(
        "merge", "tides", "logs", "--method", "ties", "--into-adapter", "t", "--store", str(llama_pair), cwd=cwd
    )
    assert r.returncode == 2 and "needs --density" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("merge", "tides", "logs", "--store", str(llama_pair), cwd=cwd)
    assert r.returncode == 2 and "--into-adapter NAME" in r.stderr
