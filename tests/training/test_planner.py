"""`lorakit plan`: parameter counts equal peft's, data counts equal the packer's, the memory estimate behaves as
the parts it models (checkpointing, quantization, loss path, batch and block), the advice and --fit are consistent
with the estimate, bad input gets a message, and `lorakit train` warns before loading a run that will not fit."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import RECIPES, TIDES, run_cli, tiny_recipe, write_recipe
from lorakit.estimate import GiB, gpu_spec
from lorakit.recipe import validate_recipe
from lorakit.training.planner import plan_recipe

CHAT = RECIPES / "data" / "chat.jsonl"
LLAMA_8B = {  # Llama-3.1-8B's config.json, as published (weights never needed)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
}  # fmt: skip


@pytest.fixture(scope="module")
def config_only(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama-8b-config")
    (d / "config.json").write_text(json.dumps(LLAMA_8B))
    return d


def test_parameter_counts_equal_peft_on_the_real_model(tiny_llama):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from lorakit.training.trainer import build_lora_config

    for lora in ({"r": 4}, {"r": 8, "target_modules": ["q_proj", "v_proj"]}, {"r": 2, "use_dora": True}):
        recipe = validate_recipe(tiny_recipe(tiny_llama, TIDES, lora=lora), "t")
        report = plan_recipe(recipe)
        real = get_peft_model(
            AutoModelForCausalLM.from_pretrained(tiny_llama), build_lora_config(recipe, report.target.plan)
        )
        assert (report.estimate.trainable, report.estimate.total) == real.get_nb_trainable_parameters(), lora


def test_data_counts_equal_the_packer_and_the_trainer(tiny_llama, tmp_path):
    from trl.data_utils import pack_dataset

    from lorakit.data.prepare import prepare
    from lorakit.models.reference import resolve
    from lorakit.models.tokenizer import load_tokenizer

    body = tiny_recipe(tiny_llama, TIDES, train={"max_steps": None, "epochs": 2, "batch_size": 3})
    recipe = validate_recipe(body, "t")
    d = plan_recipe(recipe).data
    data = prepare(recipe.data, load_tokenizer(resolve(str(tiny_llama))), recipe.train.seed)
    train_ds, _ = data.datasets()
    packed = pack_dataset(train_ds.select_columns(["input_ids"]), 64, "bfd")
    tokens = sum(len(x) for x in train_ds["input_ids"])
    assert d["train_tokens"] == tokens and d["examples"] == len(train_ds)
    assert d["packed_blocks"] == len(packed)
    assert d["packing_efficiency"] == pytest.approx(tokens / (len(packed) * 64))
    assert d["steps_per_epoch"] == -(-len(packed) // 3) and d["steps"] == 2 * d["steps_per_epoch"]
    assert [m["source"] for m in d["mix"]] == [TIDES.name] and d["mix"][0]["share"] == 1.0


def test_an_8b_config_alone_is_planned_and_the_parts_behave(config_only, tmp_path):
    body = tiny_recipe(config_only, TIDES, lora={"r": 32, "target_modules": "all-linear"},
                       base_model={"quantization": "4bit"}, data={"block_size": 2048},
                       train={"batch_size": 1, "precision": "auto"})  # fmt: skip
    report = plan_recipe(validate_recipe(body, "t"), gpu_spec("rtx4090"))
    assert report.data is None and "has no tokenizer" in report.notes[0]
    e = report.estimate
    # LoRA r=32 on every linear layer of Llama-3.1-8B: r x (in + out) per layer, as peft counts it
    per_layer = 32 * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + (4096 + 14336) * 3)
    assert e.trainable == 32 * per_layer and e.total == 8_030_261_248 + e.trainable
    m = e.memory
    assert m.lora == m.gradients == 4 * e.trainable and m.optimizer == 8 * e.trainable
    # 4-bit linear weights at ~0.516 bytes each (absmax doubly quantized), embeddings and head in bf16
    linear = 8_030_261_248 - 2 * 128256 * 4096 - (2 * 32 + 1) * 4096
    assert m.weights == pytest.approx(linear * (0.5 + 1 / 64 + 4 / 64 / 256) + 2 * 128256 * 4096 * 2, rel=1e-3)
    assert report.target.plan.gradient_checkpointing and m.activations < m.activations_other / 5
    assert m.loss_path == "chunked" and m.loss < m.loss_other / 10  # 2048 x 128256 logits never exist at once
    assert m.peak == max(m.phases.values()) and m.cuda_context > 0
    full = report.memory_with(quantization="none", gradient_checkpointing=False)
    assert full.weights > 2.5 * m.weights and full.activations == m.activations_other
    longer = report.memory_with(length=4096)
    assert longer.activations == pytest.approx(2 * m.activations, rel=0.01)  # linear in tokens (flash-style)
    eager = report.memory_with(attention="eager")  # not re-traced: the same settings object, eager flag aside
    assert eager.peak >= m.peak


def test_advice_and_fit_agree_with_the_estimate(config_only):
    body = tiny_recipe(config_only, TIDES, lora={"r": 16}, data={"block_size": 4096},
                       train={"batch_size": 4, "precision": "auto", "gradient_checkpointing": "off"})  # fmt: skip
    report = plan_recipe(validate_recipe(body, "t"), gpu_spec("24GB"))
    budget = 24 * GiB
    assert report.estimate.memory.peak > budget
    advice = report.advice(budget, report.target)
    assert advice[0]["change"].startswith("train.gradient_checkpointing: on")
    assert advice[1]["change"].startswith("base_model.quantization: 4bit")
    assert [a["fits"] for a in advice] == [False] * (len(advice) - 1) + [True]
    assert all(a["peak"] >= b["peak"] for a, b in zip(advice, advice[1:], strict=False))  # each step saves memory
    rows = report.fit(budget, report.target)
    assert rows and all(r["peak"] <= budget for r in rows)
    for r in rows:  # the largest: 128 tokens more does not fit (or the model's context is reached)
        more = report.target.memory_with(rows=r["batch"], length=r["block_size"] + 128).peak
        assert more > budget or r["block_size"] + 128 > LLAMA_8B["max_position_embeddings"]
    assert [r["block_size"] for r in rows] == sorted((r["block_size"] for r in rows), reverse=True)


def test_cli_plan_on_a_config_only_folder_and_train_refuses_it(config_only, tmp_path):
    body = tiny_recipe(config_only, TIDES, base_model={"quantization": "4bit"}, data={"block_size": 1024},
                       train={"precision": "auto", "batch_size": 1})  # fmt: skip
    recipe = write_recipe(tmp_path, body)
    res = run_cli("plan", str(recipe), "--gpu", "12GB", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["parameters"]["total"] > 8e9 and out["memory"]["peak"] < 12 * GiB and out["fits"] is True
    assert [v["gib"] for v in out["verdicts"]] == [8, 12, 16, 24, 40, 48, 80]
    assert out["memory"]["target"] == "a 12 GB GPU" and out["memory"]["device"] == "cuda"
    text = run_cli("plan", str(recipe), "--gpu", "6GB", cwd=tmp_path)
    said = " ".join(text.stdout.split())
    assert text.returncode == 0 and "does not fit" in said and "train.batch_size" not in said  # batch is 1 already
    assert "train.optimizer: paged_adamw_8bit" in said  # checkpointing and 4-bit already: the optimizer is next
    assert "data.block_size: 256" in said and "none of these makes it fit" in said  # 5.3 GiB of 4-bit weights
    bad = run_cli("plan", str(recipe), "--gpu", "potato", cwd=tmp_path)
    assert bad.returncode == 2 and "--gpu 'potato'" in bad.stderr and "Traceback" not in bad.stderr
    train = run_cli("train", str(recipe), cwd=tmp_path)
    assert train.returncode == 2 and "Traceback" not in train.stderr
    assert "tokenizer" in train.stderr or "weights" in train.stderr, train.stderr


def test_untraceable_model_gets_a_parameter_only_estimate(tiny_llama, monkeypatch):
    import lorakit.estimate as est

    def refuses(*a, **k):
        raise NotImplementedError("a custom kernel with no meta implementation")

    monkeypatch.setattr(est, "trace", refuses)
    report = plan_recipe(validate_recipe(tiny_recipe(tiny_llama, TIDES), "t"))
    assert report.estimate.traced == "parameters only" and "activations not estimated" in report.notes[0]
    assert report.estimate.memory.activations == 0 and report.estimate.memory.weights > 0


def test_show_tokens_marks_trained_tokens_and_warns(tiny_llama, tmp_path):
    from lorakit.training.show_tokens import check_examples

    ends = {9}
    found = check_examples(
        [[1, 2, 3, 9], [1, 2, 3, 9], [1, 2, 3]],
        [[-100, 2, 3, -100], [-100, 2, 3, 9], [-100, -100, -100]],
        ends,
    )
    assert found.untrained_end == [0] and found.nothing_trained == [2]
    chat = {"sources": [{"path": str(CHAT), "format": "chat"}]}
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_llama, CHAT, data=chat))
    res = run_cli("plan", str(recipe), "--show-tokens", "2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    said = " ".join(res.stdout.split())
    assert "block 1 of" in said and "tokens trained" in said
    assert "every trained turn's end token is trained" in said  # lorakit trains <|im_end|> with each reply


def test_train_warns_before_loading_a_run_that_will_not_fit(tiny_llama, tmp_path, monkeypatch):
    from lorakit.training.run import train
    from test_plan import Loaded, simulate_cuda

    simulate_cuda(monkeypatch, memory=64 << 20)  # a 64 MiB GPU
    from transformers import AutoModelForCausalLM

    def stop(*a, **k):
        raise Loaded

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", stop)
    said: list[str] = []
    body = tiny_recipe(tiny_llama, TIDES, train={"precision": "auto", "batch_size": 64}, data={"block_size": 512})
    body["output"] = {"name": "w", "store": str(tmp_path / "a"), "runs_dir": str(tmp_path / "r")}
    with pytest.raises(Loaded):
        train(validate_recipe(body, "t"), say=said.append)
    warning = next(line for line in said if line.startswith("warning: lorakit plan estimates"))
    assert "more than Simulated GPU (0.06 GiB)" in warning
    assert any("train.gradient_checkpointing" in line or "data.block_size" in line for line in said)
    assert torch.cuda.is_available()  # still simulated: the warning came before any load


def test_gpu_names_and_sizes():
    assert gpu_spec("rtx4090").memory == 24 * GiB and gpu_spec("24GB").memory == 24 * GiB
    assert gpu_spec("A100-80GB").memory == 80 * GiB and not gpu_spec("t4").bf16
    assert gpu_spec("12").memory == 12 * GiB


def test_probe_runs_real_steps_and_keeps_nothing(tiny_llama, tmp_path):
    body = tiny_recipe(tiny_llama, TIDES, train={"max_steps": None, "epochs": 3})
    res = run_cli("plan", str(write_recipe(tmp_path, body)), "--probe", "2", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    p = out["probe"]
    assert p["steps"] == 2 and p["seconds_per_step"] > 0 and p["tokens_per_second"] > 0
    assert p["run_steps"] == out["plan"]["steps"] > 2 and p["eta"]
    assert p["peak_kind"] == "process peak RSS" and p["peak_memory"] > 0
    assert not (tmp_path / "adapters").exists() and not (tmp_path / "runs").exists()
