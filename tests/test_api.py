"""The Python API (`import lorakit`): each function gives what the library underneath gives directly."""

from __future__ import annotations

import subprocess
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import lorakit
from conftest import TIDES, tiny_recipe, write_recipe


def test_import_is_light():
    code = "import sys, lorakit; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_train_load_generate_merge(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_llama, TIDES))
    plan = lorakit.dry_run(recipe)
    assert plan.device == "cpu" and plan.steps == 6
    result = lorakit.train(recipe, overrides=["train.learning_rate=2e-2"])
    assert result.path == tmp_path / "adapters" / "tiny" and result.metrics["steps"] == 6

    model, tokenizer = lorakit.load("tiny")
    ids = tokenizer("Day 3. Wind:", return_tensors="pt")["input_ids"]
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(result.path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits)
        expected = plain.generate(input_ids=ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :]
    text = lorakit.generate("tiny", "Day 3. Wind:", max_new_tokens=8, temperature=0)
    assert text == tokenizer.decode(expected, skip_special_tokens=True)

    report = lorakit.merge("tiny", tmp_path / "merged")
    assert report.relative_diff <= report.tolerance and (tmp_path / "merged" / "config.json").is_file()
