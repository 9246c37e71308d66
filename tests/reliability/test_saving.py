"""A failed final save (a full disk) loses nothing: the previous adapter of that name stays intact."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import RECIPES, tiny_recipe
from lorakit.errors import LorakitError
from lorakit.recipe import validate_recipe
from lorakit.store.adapters import list_adapters
from lorakit.training.run import train

TIDES = RECIPES / "data" / "tides.txt"


def test_disk_full_during_the_final_save_keeps_the_previous_adapter(tiny_llama, tmp_path, monkeypatch):
    body = tiny_recipe(tiny_llama, TIDES, train={"max_steps": 3, "learning_rate": 2e-2})
    body["output"] = {"name": "kept", "store": str(tmp_path / "adapters"), "runs_dir": str(tmp_path / "runs")}
    first = train(validate_recipe(body, "test"))
    before = {p.name: p.read_bytes() for p in first.path.iterdir()}

    def full_disk(self, path, **kwargs):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "adapter_model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PeftModel, "save_pretrained", full_disk)
    body["train"]["seed"] = 7
    with pytest.raises(LorakitError, match="No space left on device"):
        train(validate_recipe(body, "test"), overwrite=True)
    monkeypatch.undo()

    assert {p.name: p.read_bytes() for p in first.path.iterdir()} == before
    assert [p.name for p in (tmp_path / "adapters").iterdir()] == ["kept"]  # no .tmp-/.old- leftovers
    assert [r["name"] for r in list_adapters(tmp_path / "adapters")] == ["kept"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(first.path))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()
