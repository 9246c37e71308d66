"""The Plan: every automatic choice resolved once, on this CPU and on a simulated CUDA machine, and every verb's
load path placing the model where its Plan says."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch

from conftest import TIDES, quiet, run_cli, tiny_recipe, trained, write_recipe
from lorakit.plan import Machine, plan_inference, plan_training, probe
from lorakit.recipe import BaseModelSection, RecipeError, validate_recipe
from lorakit.recipe.load import read_text_yaml

GB = 2**30


def simulate_cuda(monkeypatch, gpus: int = 1, memory: int = 24 * GB, bf16: bool = True) -> None:
    """torch reports `gpus` CUDA devices of `memory` bytes: what `lorakit.plan.probe` reads."""
    props = SimpleNamespace(name="Simulated GPU", total_memory=memory)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


class Loaded(Exception):
    """Raised by the patched from_pretrained: the load request is all a test needs."""


@pytest.fixture
def load_requests(monkeypatch):
    """Every AutoModelForCausalLM.from_pretrained call's keyword arguments; the call itself stops there."""
    from transformers import AutoModelForCausalLM

    seen: list[dict] = []

    def capture(path, **kwargs):
        seen.append(kwargs)
        raise Loaded

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", capture)
    return seen


def test_probe_reads_the_simulated_machine(monkeypatch):
    simulate_cuda(monkeypatch, gpus=2, memory=80 * GB, bf16=False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    m = probe()
    assert [g.memory for g in m.gpus] == [80 * GB, 80 * GB] and not m.gpus[0].bf16
    assert (m.local_rank, m.world_size) == (1, 2)


@pytest.mark.parametrize("bf16", [True, False])
def test_training_plan_on_cuda(monkeypatch, tiny_llama, bf16):
    simulate_cuda(monkeypatch, gpus=2, bf16=bf16)
    monkeypatch.setenv("LOCAL_RANK", "1")
    r = validate_recipe(tiny_recipe(tiny_llama, TIDES, train={"precision": "auto"}), "t")
    plan = plan_training(r, probe(), ["q_proj"])
    assert plan.device == "cuda:1"
    assert (plan.precision, plan.weights_dtype) == (("bf16", "bfloat16") if bf16 else ("fp16", "float16"))
    assert plan.gradient_checkpointing  # auto: on for GPUs
    assert plan.attn_implementation is None  # transformers' default (sdpa, or flash attention if asked for)
    assert plan.lora_alpha == 32 and plan.target_modules == ("q_proj",)  # alpha 32 whatever r is


def test_training_plan_on_this_cpu(tiny_llama):
    r = validate_recipe(tiny_recipe(tiny_llama, TIDES), "t")
    plan = plan_training(r, Machine(), "all-linear")
    assert (plan.device, plan.precision, plan.weights_dtype) == ("cpu", "fp32", "float32")
    assert not plan.gradient_checkpointing and plan.packing == "padding-free"
    assert plan.attn_implementation == "per-document sdpa"  # packed CPU training; checked again at load
    with pytest.raises(Exception, match="fp16 needs a GPU"):
        plan_training(validate_recipe(tiny_recipe(tiny_llama, TIDES, train={"precision": "fp16"}), "t"), Machine(), "a")


@pytest.mark.parametrize(
    ("hidden", "lr"),
    [(576, 2.7e-3), (768, 2.1e-3), (2048, 1e-3), (3072, 7.3e-4), (4096, 5.8e-4), (8192, 3.4e-4), (64, 3e-3)],
)
def test_auto_learning_rate_from_the_width(tiny_llama, hidden, lr):
    r = validate_recipe(tiny_recipe(tiny_llama, TIDES, train={"learning_rate": "auto"}), "t")
    plan = plan_training(r, Machine(), "all-linear", hidden_size=hidden)
    assert plan.learning_rate == pytest.approx(lr, rel=1e-9)
    assert plan.learning_rate_from.startswith("auto") and f"hidden size {hidden}" in plan.learning_rate_from
    assert ("held to" in plan.learning_rate_from) == (hidden == 64)  # a tiny model's 0.015 is held to 3e-3
    assert f"learning rate {lr:.2g} (auto" in "\n".join(plan.summary())


@pytest.mark.parametrize(("rows", "factor"), [(None, 1.0), (40, 1.5), (400, 1.5), (4000, 1.0), (40000, 1.0)])
def test_short_runs_get_a_higher_automatic_rate(tiny_llama, rows, factor):
    # batch 4, accumulation 1, 1 epoch: rows / 4 optimizer steps; <= 100 steps get 1.5x, >= 1000 none of it
    r = validate_recipe(
        tiny_recipe(
            tiny_llama, TIDES, train={"learning_rate": "auto", "batch_size": 4, "max_steps": None, "epochs": 1}
        ),
        "t",
    )
    plan = plan_training(r, Machine(), "all-linear", packed_rows=rows, hidden_size=2048)
    assert plan.learning_rate == pytest.approx(1e-3 * factor)
    assert ("short run" in plan.learning_rate_from) == (factor != 1.0)
    middle = plan_training(r, Machine(), "all-linear", packed_rows=4 * 316, hidden_size=2048)  # 316 steps: halfway
    assert middle.learning_rate == pytest.approx(1e-3 * 1.5**0.5, rel=0.05)  # to 2 digits


def test_auto_learning_rate_is_the_default_and_a_written_one_is_kept(tiny_llama):
    body = tiny_recipe(tiny_llama, TIDES)
    del body["train"]["learning_rate"]
    assert validate_recipe(body, "t").train.learning_rate == "auto"
    no_width = plan_training(validate_recipe(body, "t"), Machine(), "all-linear")
    assert no_width.learning_rate == 2e-4 and "no hidden size" in no_width.learning_rate_from
    for written in ("3.3e-4", "1e-3", "7.5e-05"):  # as a recipe file writes them: YAML 1.2 numbers, dot or not
        value = read_text_yaml(f"lr: {written}")["lr"]
        r = validate_recipe(tiny_recipe(tiny_llama, TIDES, train={"learning_rate": value}), "t")
        plan = plan_training(r, Machine(), "all-linear", hidden_size=576)
        assert (plan.learning_rate, plan.learning_rate_from) == (float(written), "recipe")
    for bad in ("fast", "1e-3", 0, 1.5, -1e-4):  # a quoted "1e-3" is text, as the recipe's JSON Schema says
        with pytest.raises(RecipeError, match=r"train\.learning_rate: .*(auto|greater|less|number)"):
            validate_recipe(tiny_recipe(tiny_llama, TIDES, train={"learning_rate": bad}), "t")


def test_hidden_size_of_configs():
    from transformers import GPT2Config, LlamaConfig

    from lorakit.training.preflight import hidden_size

    assert hidden_size(GPT2Config(n_embd=768)) == 768  # GPT-2 calls it n_embd
    assert hidden_size(LlamaConfig(hidden_size=576)) == 576
    assert hidden_size(SimpleNamespace()) is None


def test_inference_plan_one_gpu_or_spread(monkeypatch):
    simulate_cuda(monkeypatch, memory=24 * GB)
    section = BaseModelSection()
    fits = plan_inference("generate", section, probe(), n_params=7 * 10**9)  # 14 GB in bf16
    assert (fits.device, fits.device_map, fits.weights_dtype) == ("cuda:0", None, "bfloat16")
    big = plan_inference("generate", section, probe(), n_params=70 * 10**9)
    assert big.device_map == "auto" and "do not fit one GPU" in big.notes[0]


@pytest.fixture(scope="module")
def two_adapters(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plan-store")
    trained(tiny_llama, tmp, "a")
    return trained(tiny_llama, tmp, "b")


def _on_gpu(request: dict) -> None:
    assert request["device_map"] == {"": 0}, request
    assert request["dtype"] == torch.bfloat16, request


@pytest.mark.parametrize("verb", ["generate", "chat", "eval"])
def test_inference_verbs_load_on_the_gpu(monkeypatch, load_requests, two_adapters, verb):
    from lorakit.store import loader

    simulate_cuda(monkeypatch)
    with pytest.raises(Loaded):
        loader.load(two_adapters, ["a", "b"], verb=verb)
    _on_gpu(load_requests[-1])


def test_merge_combine_and_export_load_on_the_gpu(monkeypatch, load_requests, two_adapters, tiny_llama, tmp_path):
    from lorakit.deploy.combine import combine_adapters
    from lorakit.deploy.gguf import export_gguf
    from lorakit.deploy.merge import merge_adapter

    simulate_cuda(monkeypatch)
    with pytest.raises(Loaded):
        merge_adapter(two_adapters, "a", tmp_path / "merged", say=quiet)
    with pytest.raises(Loaded):
        combine_adapters(two_adapters, ["a", "b"], "ab", say=quiet)
    with pytest.raises(Loaded):
        export_gguf(tiny_llama, tmp_path / "m.gguf", say=quiet)
    # merge, combine and export keep the dtype they verify in (float32 by default), on the GPU
    assert [r["device_map"] for r in load_requests] == [{"": 0}] * 3
    assert [r["dtype"] for r in load_requests] == [torch.float32] * 3


def test_training_loads_on_the_gpu(monkeypatch, load_requests, tiny_llama, tmp_path):
    from lorakit.training.run import train

    simulate_cuda(monkeypatch)
    monkeypatch.chdir(tmp_path)
    body = tiny_recipe(tiny_llama, TIDES, train={"precision": "auto"})
    with pytest.raises(Loaded):
        train(validate_recipe(body, "t"), say=quiet)
    _on_gpu(load_requests[-1])


def test_plan_predicts_the_trainers_steps_and_is_saved(tiny_llama, tmp_path):
    from lorakit.training.run import train

    body = tiny_recipe(tiny_llama, TIDES, train={"max_steps": None, "epochs": 2, "gradient_accumulation": 2})
    body["train"]["learning_rate"] = "auto"
    body["output"] = {"name": "steps", "store": str(tmp_path / "a"), "runs_dir": str(tmp_path / "r")}
    result = train(validate_recipe(body, "t"), say=quiet)
    plan = result.meta.plan
    assert plan.steps == result.metrics["steps"] == 2 * plan.steps_per_epoch
    assert plan.device == "cpu" and plan.verb == "train"
    # the automatic learning rate is the trainer's peak (warmup, then cosine) and is saved with where it came from
    rows = [json.loads(line) for line in (tmp_path / "r" / "steps" / "metrics.jsonl").read_text().splitlines()]
    lrs = [row["learning_rate"] for row in rows if "learning_rate" in row]
    assert plan.learning_rate == 4.5e-3 and 0.5 * plan.learning_rate < max(lrs) <= plan.learning_rate  # 3e-3 x 1.5
    saved = json.loads((tmp_path / "a" / "steps" / "lorakit.json").read_text())["plan"]
    assert saved["learning_rate"] == 4.5e-3 and saved["learning_rate_from"].startswith(
        "auto: 0.001 x (2048 / hidden size 64)"
    )
    assert (
        json.loads((tmp_path / "a" / "steps" / "lorakit.json").read_text())["recipe"]["train"]["learning_rate"]
        == "auto"
    )
    assert result.meta.learning_rate_text().startswith("0.0045 (auto: ")
    assert "| learning rate | 0.0045 (auto: " in (tmp_path / "a" / "steps" / "README.md").read_text()


def test_dry_run_prints_the_plan_without_reading_weights(tiny_llama, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    (model / "model.safetensors").write_bytes(b"not weights")  # a run that read them would fail
    recipe = write_recipe(tmp_path, tiny_recipe(model, TIDES, train={"max_steps": None, "epochs": 1}))
    res = run_cli("train", str(recipe), "--dry-run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = " ".join(res.stdout.split())  # rich wraps long lines in a pipe
    assert "plan: device cpu" in out and re.search(r"\b(\d+) steps \(\1 per epoch\)", out) and "target modules:" in out
    assert "attention per-document sdpa" in out
    assert not (tmp_path / "adapters").exists() and not (tmp_path / "runs").exists()
