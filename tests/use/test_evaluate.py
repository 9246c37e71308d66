"""`lorakit eval`: loss and perplexity of base, adapters and merged models on one data file."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import RECIPES, run_cli, trained
from lorakit.data.tokens import IGNORE
from lorakit.deploy.merge import merge_adapter
from lorakit.errors import LorakitError
from lorakit.use.evaluate import evaluate, examples

TIDES = RECIPES / "data" / "tides.txt"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """CLI subprocesses on one thread: on a busy 2-core machine the tiny models run far slower on two."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


def direct_loss(model, blocks) -> float:
    """transformers' own loss (mean over a block's supervised tokens), weighted by each block's count."""
    total, count = 0.0, 0
    with torch.no_grad():
        for b in blocks:
            n = sum(t != IGNORE for t in b.labels[1:])
            out = model(input_ids=torch.tensor([b.input_ids]), labels=torch.tensor([b.labels]))
            total, count = total + float(out.loss) * n, count + n
    return total / count


@pytest.fixture(scope="module")
def store(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    trained(tiny_llama, tmp, "tiny")
    return tmp / "adapters"


def test_eval_matches_a_direct_computation(tiny_llama, store, tmp_path):
    merged = merge_adapter(store, "tiny", tmp_path / "merged", say=lambda *_: None).out
    rows = evaluate(TIDES, "text", ["tiny"], base_only=True, model_dirs=[str(merged)], store=store)
    assert [r["model"] for r in rows] == ["base", "adapter tiny", f"model {merged}"]
    blocks = examples(TIDES, "text", AutoTokenizer.from_pretrained(tiny_llama))
    assert len(blocks) > 1 and max(len(b.input_ids) for b in blocks) <= 256
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    assert rows[0]["loss"] == pytest.approx(direct_loss(base, blocks), rel=1e-5)
    peft = PeftModel.from_pretrained(base, str(store / "tiny")).eval()
    assert rows[1]["loss"] == pytest.approx(direct_loss(peft, blocks), rel=1e-5)
    assert rows[2]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-5)  # the merged model is base+adapter
    assert rows[1]["loss"] < rows[0]["loss"] and rows[1]["perplexity"] == pytest.approx(math.exp(rows[1]["loss"]))
    assert rows[0]["tokens"] == rows[1]["tokens"] == sum(len(b.input_ids) - 1 for b in blocks)
    with pytest.raises(LorakitError, match="--base-only, --adapter NAME or --model DIR"):
        evaluate(TIDES, "text", store=store)


def test_cli_eval_json_and_table(store):
    work = store.parent
    res = run_cli("eval", "--data", str(TIDES), "--adapter", "tiny", "--base-only", "--json", cwd=work)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = json.loads(res.stdout)
    assert [r["model"] for r in rows] == ["base", "adapter tiny"] and rows[1]["loss"] < rows[0]["loss"]
    direct = evaluate(TIDES, "text", ["tiny"], base_only=True, store=store)
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in direct], rel=1e-5)
