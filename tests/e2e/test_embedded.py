"""End to end through the real CLI on the embedded SmolLM2-135M: the shipped quickstart as a user runs it."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import read_meta, run_cli
from lorakit.store.loader import load

pytestmark = pytest.mark.e2e

PROMPT = "# Keeper's Log — Gull Rock Light, Week 2\n\nDay 8. Wind:"


@pytest.fixture(scope="module")
def workdir(walkthrough):
    """A user's folder holding the shipped recipes, where the README's walkthrough ran."""
    return walkthrough.workdir


@pytest.fixture(scope="module")
def quickstart(walkthrough):
    """`lorakit train recipes/quickstart.yaml`, exactly as shipped (the walkthrough's first command)."""
    return walkthrough.result


def test_quickstart_eval_loss_drops(quickstart, workdir):
    out = quickstart.stdout
    assert "target modules: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in out
    assert "saved adapter 'quickstart'" in out
    m = read_meta(workdir / "adapters", "quickstart")["metrics"]
    # Measured: 3.57 -> 2.04. A visible drop, not noise.
    assert m["eval_loss_after"] < m["eval_loss_before"] - 0.5, m


def test_plain_peft_loads_adapter_with_the_same_logits(quickstart, workdir, embedded):
    tok = AutoTokenizer.from_pretrained(embedded)
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(embedded)
    plain = PeftModel.from_pretrained(base, str(workdir / "adapters" / "quickstart")).eval()
    ours = load(workdir / "adapters", "quickstart")
    with torch.no_grad():
        want = plain(input_ids=ids).logits
        got = ours.model(input_ids=ids).logits
        with plain.disable_adapter():
            before = plain(input_ids=ids).logits
    torch.testing.assert_close(got, want)
    # The adapter changes what the model predicts, and toward the training domain's format.
    assert (want - before).abs().max() > 1.0
    log_format = tok(" NW", add_special_tokens=False)["input_ids"][0]
    assert want[0, -1].log_softmax(-1)[log_format] > before[0, -1].log_softmax(-1)[log_format]


def test_generate_compare_through_the_cli(quickstart, workdir):
    res = run_cli(
        "generate", "--adapter", "quickstart", "--compare", "--temperature", "0", "--max-new-tokens", "24", PROMPT,
        cwd=workdir,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "base model" in res.stdout and "adapter quickstart" in res.stdout
    adapter_part = res.stdout.split("adapter quickstart", 1)[1]
    assert "Sea:" in adapter_part or "Visibility" in adapter_part or "force" in adapter_part, res.stdout


def test_qlora_trains_and_saves(workdir):
    res = run_cli(
        "train", "recipes/quickstart-qlora.yaml", "--set", "train.max_steps=3", "--set", "data.block_size=128",
        cwd=workdir, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    meta = read_meta(workdir / "adapters", "quickstart-qlora")
    assert meta["method"] == "QLoRA" and meta["recipe"]["base_model"]["quant_type"] == "nf4"
    assert meta["metrics"]["steps"] == 3
    assert (workdir / "adapters" / "quickstart-qlora" / "adapter_model.safetensors").stat().st_size > 1_000_000
