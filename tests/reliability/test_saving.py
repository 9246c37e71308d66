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


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "runs/tiny/metrics.jsonl")


def test_disk_full_in_the_runs_folder_keeps_the_last_checkpoint(tiny_llama, tmp_path, monkeypatch):
    from lorakit.training.callbacks import RunLog
    from lorakit.training.checkpoints import checkpoints

    body = tiny_recipe(tiny_llama, TIDES, data={"eval_split": 0}, train={"max_steps": 8, "save_every": 2})
    body["train"]["logging_every"] = 1
    body["output"] = {"name": "tiny", "store": str(tmp_path / "adapters"), "runs_dir": str(tmp_path / "runs")}
    original = RunLog.on_log

    def fills_at_step_3(self, args, state, control, logs=None, **kw):
        if state.global_step >= 3:
            _full_disk()
        return original(self, args, state, control, logs=logs, **kw)

    monkeypatch.setattr(RunLog, "on_log", fills_at_step_3)
    with pytest.raises(LorakitError, match=r"the disk filled while training .*checkpoint-2, is kept.*--resume"):
        train(validate_recipe(body, "test"), say=lambda _: None)
    assert [p.name for p in checkpoints(tmp_path / "runs" / "tiny")] == ["checkpoint-2"]
    assert not (tmp_path / "adapters").exists()


def test_disk_full_at_the_first_checkpoint_is_a_message(tiny_llama, tmp_path, monkeypatch):
    from lorakit.training import callbacks

    body = tiny_recipe(tiny_llama, TIDES, data={"eval_split": 0}, train={"max_steps": 4, "save_every": 2})
    body["output"] = {"name": "tiny", "store": str(tmp_path / "adapters"), "runs_dir": str(tmp_path / "runs")}
    monkeypatch.setattr(callbacks, "complete", _full_disk)
    with pytest.raises(LorakitError, match="no checkpoint was complete yet: free some space and start again"):
        train(validate_recipe(body, "test"), say=lambda _: None)
