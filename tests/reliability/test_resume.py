"""Ctrl-C writes a checkpoint; --resume continues exactly; unfinished checkpoints are never used."""

from __future__ import annotations

import json
import os
import shutil
import signal
import types

import pytest
import torch
from safetensors.torch import load_file

from conftest import RECIPES, run_cli, tiny_recipe, write_recipe
from lorakit.errors import LorakitError
from lorakit.recipe import load_recipe, validate_recipe
from lorakit.training.callbacks import Checkpoints, GracefulStop
from lorakit.training.checkpoints import (
    MARKER,
    RUN_FILE,
    Interrupted,
    checkpoints,
    find_resume,
    mark_complete,
    prune,
    write_run,
)
from lorakit.training.run import train

TIDES = RECIPES / "data" / "tides.txt"


def recipe(model_dir, root, name, **sections):
    body = tiny_recipe(model_dir, TIDES, **sections)
    body["train"].update({"max_steps": 8, "save_every": 2, "learning_rate": 1e-2, "logging_every": 1})
    body["output"] = {"name": name, "store": str(root / "adapters"), "runs_dir": str(root / "runs")}
    return validate_recipe(body, "test")


def losses(root, name):
    rows = [json.loads(x) for x in (root / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["learning_rate"]) for r in rows if "loss" in r}


def interrupt_at(monkeypatch, step):
    """Deliver a real SIGINT to this process at the end of `step`, as Ctrl-C would."""
    original = GracefulStop.on_step_end

    def hooked(self, args, state, control, **kw):
        if state.global_step == step and not self.requested:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, args, state, control, **kw)

    monkeypatch.setattr(GracefulStop, "on_step_end", hooked)


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    result = train(recipe(tiny_llama, root, "run"))
    return root, result


def test_interrupt_then_resume_matches_an_uninterrupted_run(uninterrupted, tiny_llama, tmp_path, monkeypatch):
    root_a, result_a = uninterrupted
    r = recipe(tiny_llama, tmp_path, "run")
    interrupt_at(monkeypatch, 3)  # mid-epoch, and between two checkpoint steps
    with pytest.raises(Interrupted) as exc:
        train(r)
    assert exc.value.step == 3 and exc.value.checkpoint.name == "checkpoint-3"
    assert (exc.value.checkpoint / MARKER).is_file()
    assert json.loads((exc.value.checkpoint / RUN_FILE).read_text())["recipe"]["lora"]["r"] == 4
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= {
        p.name for p in exc.value.checkpoint.iterdir()
    }
    run_dir = tmp_path / "runs" / "run"
    assert checkpoints(run_dir, complete_only=False) == checkpoints(run_dir)  # every checkpoint folder is marked
    assert not (tmp_path / "adapters" / "run").exists()  # nothing half-done in the store
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    monkeypatch.undo()

    result_b = train(r, resume=True)
    assert result_b.metrics["steps"] == 8
    a = load_file(result_a.path / "adapter_model.safetensors")
    b = load_file(result_b.path / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    la, lb = losses(root_a, "run"), losses(tmp_path, "run")
    for step in range(4, 9):  # the steps run after resuming: same batches, same loss, same learning rate
        assert lb[step][0] == pytest.approx(la[step][0], rel=1e-5), step
        assert lb[step][1] == pytest.approx(la[step][1], rel=1e-9), step
    assert result_b.metrics["eval_loss_before"] == result_a.metrics["eval_loss_before"]
    assert result_b.metrics["eval_loss_after"] == pytest.approx(result_a.metrics["eval_loss_after"], rel=1e-5)
    assert not checkpoints(tmp_path / "runs" / "run", complete_only=False)  # cleaned up at the end


def test_qlora_resume_matches_an_uninterrupted_run(tiny_llama, tmp_path, monkeypatch):
    """A 4-bit base trained in bf16 (its embeddings and norms held in bf16, the adapter cast back to float32 from
    TRL's bf16): the resumed run picks up the float32 adapter and its optimizer state as they were saved."""
    q = {"base_model": {"quantization": "4bit"}, "train": {"precision": "bf16"}}
    straight = train(recipe(tiny_llama, tmp_path / "a", "run", **q))
    r = recipe(tiny_llama, tmp_path / "b", "run", **q)
    interrupt_at(monkeypatch, 3)
    with pytest.raises(Interrupted):
        train(r)
    monkeypatch.undo()
    resumed = train(r, resume=True)
    a = load_file(straight.path / "adapter_model.safetensors")
    b = load_file(resumed.path / "adapter_model.safetensors")
    assert a.keys() == b.keys() and {t.dtype for t in b.values()} == {torch.float32}
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    assert resumed.metrics["eval_loss_after"] == pytest.approx(straight.metrics["eval_loss_after"], rel=1e-4)


def test_resume_with_a_changed_recipe_is_refused(tiny_llama, tmp_path, monkeypatch):
    interrupt_at(monkeypatch, 2)
    with pytest.raises(Interrupted):
        train(recipe(tiny_llama, tmp_path, "run"))
    monkeypatch.undo()
    changed = recipe(tiny_llama, tmp_path, "run", lora={"dropout": 0.1}, data={"block_size": 32})
    with pytest.raises(LorakitError) as exc:
        train(changed, resume=True)
    assert "lora.dropout: 0.0 -> 0.1" in str(exc.value) and "block_size: 64 -> 32" in str(exc.value)
    assert "--force" in str(exc.value)
    # A fresh start without --overwrite must not silently discard the unfinished run either.
    with pytest.raises(LorakitError, match="unfinished run.*--resume"):
        train(recipe(tiny_llama, tmp_path, "run"))


def test_resume_ignores_an_unfinished_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    for step, complete in ((2, True), (4, True), (6, False)):
        (run_dir / f"checkpoint-{step}").mkdir(parents=True)
        if complete:
            mark_complete(run_dir / f"checkpoint-{step}")
    write_run(run_dir, {"resume_key": {"a": 1}})
    ckpt, _ = find_resume(run_dir, {"a": 1}, force=False)
    assert ckpt.name == "checkpoint-4"


def test_a_run_starts_by_removing_unfinished_checkpoints(tmp_path):
    """A checkpoint cut short by a crash is removed before training writes any: a save of the same step must not
    find the earlier run's files (another process's RNG state, say) in its folder."""
    (tmp_path / "checkpoint-2").mkdir()
    mark_complete(tmp_path / "checkpoint-2")
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "rng_state_1.pth").write_bytes(b"left by a crash")
    Checkpoints(tmp_path, keep=2).on_train_begin(None, types.SimpleNamespace(is_world_process_zero=True), None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]


def test_prune_keeps_the_newest_complete_checkpoint(tmp_path):
    for step in (2, 4, 6, 8):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if step != 8:
            mark_complete(tmp_path / f"checkpoint-{step}")
    prune(tmp_path, keep=1)
    # checkpoint-8 is still being written (no marker) and is newer: it stays, and so does 6.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6", "checkpoint-8"]


def test_resume_without_checkpoints_says_how_to_get_them(tiny_llama, tmp_path):
    with pytest.raises(LorakitError, match="no complete checkpoint.*save_every"):
        train(recipe(tiny_llama, tmp_path, "run"), resume=True)


def test_a_second_ctrl_c_aborts_at_once():
    stop = GracefulStop(say=lambda m: None)
    stop.on_train_begin(None, None, None)
    try:
        stop.request()
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            stop.request()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored before raising
    finally:
        stop.restore()


# --- a changed input blocks `lorakit train --resume` ----------------------------------------------


@pytest.fixture(scope="module")
def unfinished(tiny_llama, tmp_path_factory):
    """A folder holding a recipe over every kind of input (a text file, a folder of files, a saved dataset and a
    separate eval file, all by relative path) and the checkpoint of its run, interrupted at step 3."""
    from datasets import Dataset

    root = tmp_path_factory.mktemp("unfinished")
    shutil.copy(TIDES, root / "tides.txt")
    (root / "logs").mkdir()
    for f in sorted((RECIPES / "data" / "lighthouse").glob("*.md"))[:2]:
        shutil.copy(f, root / "logs" / f.name)
    paragraphs = [p for p in TIDES.read_text().split("\n\n") if p.strip()]
    Dataset.from_dict({"text": paragraphs[:6]}).save_to_disk(str(root / "saved"))
    (root / "eval.txt").write_text("\n\n".join(paragraphs[6:9]))
    body = tiny_recipe(tiny_llama, TIDES, train={"max_steps": 6, "save_every": 2})
    body["data"]["sources"] = [
        {"path": "tides.txt", "split": "paragraph"},
        {"path": "logs", "split": "paragraph"},
        {"path": "saved"},
    ]
    body["data"]["eval_split"] = "eval.txt"
    write_recipe(root, body)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        interrupt_at(mp, 3)
        with pytest.raises(Interrupted):
            train(load_recipe(root / "recipe.yaml"), say=lambda *a: None)
    return root


def change_saved_dataset(work):
    from datasets import Dataset, load_from_disk

    folder = work / "saved"
    texts = load_from_disk(str(folder))["text"]
    shutil.rmtree(folder)
    Dataset.from_dict({"text": [*texts[:-1], texts[-1] + " The lamp was lit late."]}).save_to_disk(str(folder))


CHANGES = {
    "text source": (lambda d: (d / "tides.txt").write_text((d / "tides.txt").read_text() + "\n\nOne more tide."), []),
    "file in a source folder": (lambda d: (d / "logs" / "keeper-log-02.md").write_text("A new log."), []),
    "saved dataset": (change_saved_dataset, []),
    "eval file": (lambda d: (d / "eval.txt").write_text("Another held-out text."), []),
    "recipe key": (lambda d: None, ["--set", "data.block_size=32"]),
}
NAMED = {
    "text source": ["data_files.sources[0]/tides.txt: "],
    "file in a source folder": ["data_files.sources[1]/keeper-log-02.md: "],
    "saved dataset": ["data_files.sources[2]/data-00000-of-00001.arrow: "],
    "eval file": ["data_files.eval_split/eval.txt: "],
    "recipe key": ["data.block_size: 64 -> 32", "data_content: "],
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_changed_input_blocks_resume_until_forced(unfinished, tmp_path, monkeypatch, change):
    monkeypatch.setenv("COLUMNS", "250")  # one line per change (rich wraps at the terminal's width)
    work = tmp_path / "copy"
    shutil.copytree(unfinished, work, symlinks=True)  # relative paths: the copy is the same run
    done = [p.name for p in checkpoints(work / "runs" / "tiny")]
    assert done[-1] == "checkpoint-3"
    edit, overrides = CHANGES[change]
    edit(work)
    res = run_cli("train", "recipe.yaml", "--resume", *overrides, cwd=work)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    assert "changed since the checkpoint was written" in res.stderr and "--force" in res.stderr
    changed = [line.strip() for line in res.stderr.splitlines() if ": " in line and " -> " in line]
    for named in NAMED[change]:
        assert any(line.startswith(named) for line in changed), res.stderr
    if change != "recipe key":  # only the data changed: its hash, and the files of the one input changed
        keys = [line.split(": ")[0] for line in changed]
        role = NAMED[change][0].split("/")[0] + "/"
        assert keys[0] == "data_content" and all(k.startswith(role) for k in keys[1:]), res.stderr
    assert [p.name for p in checkpoints(work / "runs" / "tiny")] == done  # left as they were

    res = run_cli("train", "recipe.yaml", "--resume", "--force", *overrides, cwd=work)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resuming from" in res.stdout + res.stderr
    meta = json.loads((work / "adapters" / "tiny" / "lorakit.json").read_text())
    assert meta["metrics"]["steps"] == 6
    assert meta["data"]["content_hash"] == load_recipe_content_hash(work, overrides)


def load_recipe_content_hash(work, overrides):
    from lorakit.data.content import content_hash

    recipe = load_recipe(work / "recipe.yaml", [o for o in overrides if o != "--set"])
    return content_hash(recipe.data)


def test_forcing_a_resume_into_another_adapter_shape_is_refused(unfinished, tmp_path):
    """--force continues a run whose data or settings changed, but not one whose adapter changed shape: its weights
    could not be loaded (a size-mismatch traceback, once)."""
    work = tmp_path / "copy"
    shutil.copytree(unfinished, work, symlinks=True)
    res = run_cli("train", "recipe.yaml", "--resume", "--force", "--set", "lora.r=8", cwd=work)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    assert "shape changed" in res.stderr and "lora.r: 4 -> 8" in res.stderr and "--overwrite" in res.stderr
