"""Training on tiny models: real loss drops, plain-PEFT adapters, equality with the libraries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from conftest import RECIPES, cpu_plan, load_on_cpu, read_meta, tiny_recipe
from lorakit.errors import LorakitError
from lorakit.internals import keep_4bit_trainable_on_cpu
from lorakit.models.architecture import choose_targets, skeleton
from lorakit.models.reference import resolve, weights_fingerprint
from lorakit.models.tokenizer import load_tokenizer
from lorakit.plan import cpu_has_bf16
from lorakit.recipe import validate_recipe
from lorakit.store.loader import load
from lorakit.training.run import train
from lorakit.training.trainer import build_lora_config, build_sft_config, sft_trainer_class

TIDES = RECIPES / "data" / "tides.txt"


def recipe_for(model_dir: Path, tmp_path: Path, **sections):
    body = tiny_recipe(model_dir, TIDES, **sections)
    body["output"] = {
        **body["output"],
        "store": str(tmp_path / "adapters"),
        "runs_dir": str(tmp_path / "runs"),
    }
    return validate_recipe(body, "test")


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def trained_llama(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    r = recipe_for(tiny_llama, tmp, train={"max_steps": 25, "learning_rate": 2e-2})
    return r, train(r), tmp


def test_eval_loss_drops(trained_llama):
    _, result, _ = trained_llama
    m = result.metrics
    assert m["eval_loss_after"] < m["eval_loss_before"] - 0.05
    assert m["steps"] == 25 and m["train_tokens_seen"] > 25 * 64


def test_adapter_is_plain_peft_and_matches_lorakit_loading(trained_llama, tiny_llama):
    r, result, tmp = trained_llama
    path = result.path
    assert {"adapter_config.json", "adapter_model.safetensors", "lorakit.json", "README.md"} <= {
        p.name for p in path.iterdir()
    }
    ids = torch.randint(3, 500, (1, 24), generator=torch.Generator().manual_seed(0))
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(path)).eval()
    ours = load(tmp / "adapters", "tiny")
    torch.testing.assert_close(logits(ours.model, ids), logits(plain, ids))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    assert (logits(plain, ids) - logits(base, ids)).abs().max() > 1e-3  # the adapter changes outputs


def test_metadata_describes_the_run(trained_llama, tiny_llama):
    r, result, tmp = trained_llama
    meta = read_meta(tmp / "adapters", "tiny")
    assert meta["base_model"]["fingerprint"] == weights_fingerprint(resolve(str(tiny_llama)))
    assert meta["recipe"]["lora"]["r"] == 4 and meta["seed"] == 42
    assert meta["target_modules"] == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    assert meta["method"] == "LoRA" and meta["versions"]["peft"]
    assert meta["data"]["content_hash"].startswith("sha256:")
    assert meta["metrics"]["eval_loss_after"] == result.metrics["eval_loss_after"]
    rows = [json.loads(line) for line in (tmp / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    losses = [row for row in rows if "loss" in row]
    assert len(losses) >= 20 and all(row["tokens_per_second"] > 0 for row in losses)
    assert rows[0]["step"] == 0 and "eval_loss" in rows[0]


def test_existing_adapter_is_not_overwritten(trained_llama):
    r, result, tmp = trained_llama
    before = (result.path / "adapter_model.safetensors").read_bytes()
    with pytest.raises(LorakitError, match="already exists.*--overwrite"):
        train(r)
    assert (result.path / "adapter_model.safetensors").read_bytes() == before


def test_gpt2_conv1d_adapter(tiny_gpt2, tmp_path):
    r = recipe_for(tiny_gpt2, tmp_path, train={"max_steps": 10, "learning_rate": 2e-2})
    result = train(r)
    config = json.loads((result.path / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    assert set(config["target_modules"]) == {"c_attn", "c_fc", "c_proj"}
    ids = torch.randint(3, 500, (1, 16), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gpt2), str(result.path)).eval()
    assert (logits(plain, ids) - logits(base, ids)).abs().max() > 1e-3


def test_auto_targets_equal_peft_all_linear(tiny_llama):
    r = validate_recipe(tiny_recipe(tiny_llama, TIDES), "test")
    targets, fan = choose_targets(skeleton(resolve(str(tiny_llama))), "auto")
    ours = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama), build_lora_config(r, cpu_plan(r, targets, fan))
    )
    ref = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == sorted(
        n for n, p in ref.named_parameters() if p.requires_grad
    )


def _trainer(r, model_dir, tmp_path, cls):
    from lorakit.data.prepare import prepare

    tok = load_tokenizer(resolve(str(model_dir)))
    train_ds, _ = prepare(r.data, tok, 0).datasets()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.config.use_cache = False
    targets, fan = choose_targets(model, "auto")
    args = build_sft_config(r, tmp_path, cpu_plan(r, targets, fan), has_eval=False)
    return cls(model=model, args=args, train_dataset=train_ds, processing_class=tok,
               peft_config=build_lora_config(r, cpu_plan(r, targets, fan)))  # fmt: skip


def test_loss_equals_trl_sfttrainer_loss(tiny_llama, tmp_path):
    """lorakit's loss (the model's own) equals TRL's fused LM-head loss on the same packed batch."""
    from trl import SFTTrainer

    r = validate_recipe(tiny_recipe(tiny_llama, TIDES, lora={"dropout": 0.0}), "test")
    ours = _trainer(r, tiny_llama, tmp_path / "a", sft_trainer_class())
    theirs = _trainer(r, tiny_llama, tmp_path / "b", SFTTrainer)
    batch = ours.data_collator([ours.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        a = ours.compute_loss(ours.model, dict(batch))
        b = theirs.compute_loss(theirs.model, dict(batch))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_every_packed_document_ends_in_a_supervised_eos(tiny_llama, tmp_path):
    """Through TRL's packing and collator, each document's last supervised label is EOS."""
    lines = tmp_path / "short.txt"
    lines.write_text("\n".join(f"The tide at harbour {i} turns at {i % 12} o'clock." for i in range(60)))
    r = validate_recipe(tiny_recipe(tiny_llama, lines, data={"sources": [{"path": str(lines), "split": "line"}]}), "t")
    trainer = _trainer(r, tiny_llama, tmp_path, sft_trainer_class())
    eos = trainer.processing_class.eos_token_id
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    pos, labels = batch["position_ids"][0], batch["labels"][0]
    starts = (pos == 0).nonzero().flatten().tolist() + [len(pos)]
    assert len(starts) > 8  # several documents per packed block
    for a, b in zip(starts, starts[1:], strict=False):
        supervised = [t for t in labels[a:b].tolist() if t != -100]
        assert supervised[-1] == eos
        assert labels[a] == -100  # no loss across a document boundary
    assert eos != trainer.processing_class.pad_token_id


def test_qlora_trains_on_cpu(tiny_llama, tmp_path):
    r = recipe_for(
        tiny_llama,
        tmp_path,
        base_model={"quantization": "4bit"},
        train={"max_steps": 10, "learning_rate": 2e-2},
    )
    result = train(r)
    assert result.meta.method == "QLoRA"
    assert result.metrics["eval_loss_after"] < result.metrics["eval_loss_before"]
    loaded = load(tmp_path / "adapters", "tiny")
    assert any("Linear4bit" in type(m).__name__ for m in loaded.model.modules())


def _qlora_grads(tiny_llama, evaluate_first: bool, keep_trainable: bool) -> dict[str, torch.Tensor]:
    section = validate_recipe(tiny_recipe(tiny_llama, TIDES, base_model={"quantization": "4bit"}), "t").base_model
    model = load_on_cpu(tiny_llama, section, "bfloat16")
    if keep_trainable:
        assert keep_4bit_trainable_on_cpu(model) == 14
    torch.manual_seed(0)  # the same random LoRA weights in every call
    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids = torch.randint(3, 500, (1, 32), generator=torch.Generator().manual_seed(0))
    if evaluate_first:  # what trainer.evaluate() does before training
        peft.eval()
        with torch.no_grad():
            peft(input_ids=ids)
    peft.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        peft(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.float().clone() for n, p in peft.named_parameters() if p.requires_grad}


@pytest.mark.skipif(not cpu_has_bf16(), reason="needs a CPU with AVX512-BF16")
def test_qlora_gradients_survive_an_evaluation_before_training(tiny_llama):
    """bitsandbytes repacks 4-bit weights for inference on an eval forward; lorakit keeps them trainable."""
    want = _qlora_grads(tiny_llama, evaluate_first=False, keep_trainable=True)
    got = _qlora_grads(tiny_llama, evaluate_first=True, keep_trainable=True)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-5)
    # Without the guard, the lower layers' LoRA gradients come out wrong: the guard is what keeps them right.
    broken = _qlora_grads(tiny_llama, evaluate_first=True, keep_trainable=False)
    assert any(not torch.allclose(broken[n], want[n], rtol=1e-3, atol=1e-5) for n in want)
