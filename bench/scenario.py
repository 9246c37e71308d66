"""One benchmark scenario, run in its own process: `python bench/scenario.py SPEC.json`.

The spec (written by run.py) names the scenario kind and its settings; the result is written as
JSON to spec["out"]. Each process measures its own step times, tokens, model-load time, time to
first step (from the moment the driver spawned it) and peak RSS (VmHWM at the end).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import common


def tutorial_blocks(tokenizer, texts: list[str], block: int):
    """The tutorials' data path: tokenize, concatenate, cut into fixed blocks (run_clm's group_texts)."""
    from datasets import Dataset

    eos = tokenizer.eos_token

    def tokenize(batch):
        return tokenizer([t + eos for t in batch["text"]])

    def group_texts(batch):
        joined = {k: sum(batch[k], []) for k in batch}
        n = len(joined["input_ids"]) // block * block
        return {k: [v[i : i + block] for i in range(0, n, block)] for k, v in joined.items()}

    ds = Dataset.from_dict({"text": texts}).map(tokenize, batched=True, remove_columns=["text"])
    return ds.map(group_texts, batched=True)


def run_full_ft(spec: dict, timer) -> dict:
    """Full fine-tuning with transformers.Trainer, as the tutorials do it."""
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"])
    load_s = time.perf_counter() - started
    train_ds = tutorial_blocks(tokenizer, common.read_paragraphs(spec["train_file"]), spec["block"])
    args = TrainingArguments(
        output_dir=str(Path(spec["workdir"]) / "out" / spec["name"]),
        per_device_train_batch_size=spec["batch"],
        learning_rate=spec["lr"],
        max_steps=spec["steps"],
        report_to="none",
        disable_tqdm=True,
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, data_collator=collator)
    setup = common.instrument(trainer, timer)
    out = trainer.train()
    return {"mode": "full", "model_load_s": load_s, "setup": setup, "train_loss": out.training_loss}


def baseline_load_args(spec: dict) -> dict:
    """from_pretrained arguments of the plain script: none, or its 4-bit NF4 config for the QLoRA baseline."""
    if not spec.get("quantize"):
        return {}
    import torch
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return {"quantization_config": config, "device_map": "cpu"}


def run_trl_peft(spec: dict, timer) -> dict:
    """A plain TRL + PEFT script: library defaults except what the comparison fixes."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], **baseline_load_args(spec))
    load_s = time.perf_counter() - started
    train_ds = Dataset.from_dict({"text": common.read_paragraphs(spec["train_file"])})
    args = SFTConfig(
        output_dir=str(Path(spec["workdir"]) / "out" / spec["name"]),
        packing=True,
        max_length=spec["block"],
        per_device_train_batch_size=spec["batch"],
        learning_rate=spec["lr"],
        max_steps=spec["steps"],
        use_cpu=True,  # without it SFTConfig's default bf16=True raises "doesn't support bf16/gpu" here
        report_to="none",
        disable_tqdm=True,
    )
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer, peft_config=lora)
    setup = common.instrument(trainer, timer)
    setup["lora_dropout"] = lora.lora_dropout
    out = trainer.train()
    return {"mode": "lora", "model_load_s": load_s, "setup": setup, "train_loss": out.training_loss}


def lorakit_recipe(spec: dict) -> dict:
    """The lorakit recipe with the comparison's hyper-parameters; everything else left to lorakit."""
    work = Path(spec["workdir"])
    return {
        "base_model": {"name": spec["lorakit_model"], "quantization": "4bit" if spec.get("quantize") else "none"},
        # peft's LoraConfig defaults to lora_dropout=0.0 (lorakit's own default is 0.05): match the baseline.
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "auto"},
        "data": {
            "sources": [{"path": spec["train_file"], "format": "text", "split": "paragraph"}],
            "eval_split": 0,  # the benchmark evaluates every scenario itself, on the same blocks
            "block_size": spec["block"],
        },
        "train": {
            "max_steps": spec["steps"],
            "learning_rate": spec["lr"],
            "batch_size": spec["batch"],
            "logging_every": max(spec["steps"], 1),
        },
        "output": {"name": spec["name"], "store": str(work / "store"), "runs_dir": str(work / "runs")},
    }


def run_lorakit(spec: dict, timer) -> dict:
    """lorakit.training.run.train(recipe), with the timer attached through two module-level names."""
    import lorakit.training.run as lk_train
    from lorakit.recipe import validate_recipe

    timing: dict = {}
    setup: dict = {}
    load_model = lk_train.load_model

    def timed_load_model(*args, **kwargs):
        started = time.perf_counter()
        model = load_model(*args, **kwargs)
        timing["model_load_s"] = time.perf_counter() - started
        return model

    base_class = lk_train.sft_trainer_class()

    class Instrumented(base_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            setup.update(common.instrument(self, timer))

    lk_train.load_model = timed_load_model
    lk_train.sft_trainer_class = lambda: Instrumented
    recipe = validate_recipe(lorakit_recipe(spec), "bench", default_name=spec["name"])
    result = lk_train.train(recipe, overwrite=True)
    setup["plan"] = result.meta.plan.model_dump(mode="json")
    setup["target_modules"] = result.meta.target_modules
    setup["lora_dropout"] = recipe.lora.dropout
    train_loss = result.metrics["train_loss"]
    return {
        "mode": "lora",
        "model_load_s": timing.get("model_load_s"),
        "setup": setup,
        "train_loss": train_loss,
        "adapter_dir": str(result.path),
    }


def saved_adapter(spec: dict, adapter_dir: str):
    """The adapter lorakit wrote, in plain PEFT on the base its baseline is evaluated on: the float32 model, or
    for QLoRA the model in the baseline's 4-bit NF4 config. What a user gets from the run, on equal terms.

    lorakit trains with the frozen weights held in bf16 (autocast rounds them to bf16 at every use anyway; a
    4-bit base keeps its embeddings and norms in bf16, as on a GPU); evaluating the in-memory model would
    evaluate those bf16 weights instead of the base the plain script's adapter is evaluated on."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(spec["model_dir"], **baseline_load_args(spec))
    return PeftModel.from_pretrained(base, adapter_dir)


RUNNERS = {"full-ft": run_full_ft, "trl-peft": run_trl_peft, "lorakit": run_lorakit}


def evaluate(spec: dict, model) -> dict:
    """Eval loss of the trained model (and of its base, with the adapter switched off)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    blocks = common.eval_blocks(tokenizer, spec["eval_file"], spec["block"], spec["eval_blocks"])
    out = {"eval_blocks": len(blocks), "eval_digest": common.blocks_digest(blocks)}
    started = time.perf_counter()
    out["eval_loss"] = common.eval_loss(model, blocks)
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            out["eval_loss_base"] = common.eval_loss(model, blocks)
    out["eval_s"] = round(time.perf_counter() - started, 2)
    return out


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    timer = common.step_timer(spec["spawn_time"])
    result = RUNNERS[spec["kind"]](spec, timer)
    result.update(common.steady_state(timer.steps, spec["warmup"]))
    result.update(
        name=spec["name"],
        steps=timer.steps,
        time_to_first_step_s=timer.first_step_end_s,
        peak_rss_last_step_mb=timer.hwm_last_step_mb,
        peak_rss_after_train_mb=timer.hwm_after_train_mb,
        params=common.param_counts(spec["model_dir"]),
    )
    result["peak_rss_mb"] = common.vm_hwm_mb()  # training's peak, before the evaluation loads anything
    if spec.get("eval_blocks"):
        model = timer.model
        if spec["kind"] == "lorakit":
            timer.model = model = None
            model = saved_adapter(spec, result["adapter_dir"])
        result.update(evaluate(spec, model))
    Path(spec["out"]).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main(sys.argv[1])
