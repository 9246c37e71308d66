"""What lorakit never does: run code because a stored file says so, delete what it did not make, let two runs of
one adapter name trample each other, or lose a run's history when it is resumed."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import RECIPES, one_step_adapter, read_meta, run_cli, tiny_recipe, write_recipe
from lorakit.errors import LorakitError
from lorakit.fs import held_lock, lock_holder
from lorakit.recipe import validate_recipe
from lorakit.store.loader import load
from lorakit.training.checkpoints import LOCK_FILE, checkpoints, trim_metrics
from lorakit.training.run import train

TIDES = RECIPES / "data" / "tides.txt"
EVIL = """import pathlib

pathlib.Path({marker!r}).write_text("model code ran")

from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    pass


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
"""


def out(res) -> str:
    return res.stdout + res.stderr


def recipe_in(root: Path, model: Path, name: str = "tiny", **train_opts):
    body = tiny_recipe(model, TIDES, data={"eval_split": 0}, train={"max_steps": 1, **train_opts})
    body["output"] = {"name": name, "store": str(root / "adapters"), "runs_dir": str(root / "runs")}
    return body


@pytest.fixture(scope="module")
def store(tiny_llama, tmp_path_factory):
    """A store with one real adapter ("good", trained for one step on the tiny Llama)."""
    return one_step_adapter(tiny_llama, tmp_path_factory.mktemp("safety")).parent


# --- code from a model repository -----------------------------------------------------------------------------


def model_with_code(tiny_llama: Path, dest: Path, marker: Path) -> Path:
    """The tiny Llama (same weights) whose config maps the Auto classes to Python shipped in the folder."""
    shutil.copytree(tiny_llama, dest)
    (dest / "evil.py").write_text(EVIL.format(marker=str(marker)))
    config = json.loads((dest / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"}
    (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.fixture
def planted(store, tiny_llama, tmp_path, monkeypatch):
    """An adapter folder copied into the store whose lorakit.json names a model with code and asks to run it."""
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf-modules"))  # transformers copies the code there
    marker = tmp_path / "code-ran"
    model = model_with_code(tiny_llama, tmp_path / "model-with-code", marker)
    for name in ("planted", "planted2"):
        shutil.copytree(store / "good", store / name)
        meta = read_meta(store, name)
        meta["name"] = name
        meta["base_model"]["reference"] = str(model)
        meta["recipe"]["base_model"].update(name=str(model), trust_remote_code=True)
        (store / name / "lorakit.json").write_text(json.dumps(meta))
    yield marker
    for name in ("planted", "planted2"):
        shutil.rmtree(store / name)


@pytest.mark.parametrize(
    "verb",
    [
        ["generate", "--adapter", "planted", "hello"],
        ["merge", "planted", "--out", "merged"],
        ["eval", "--adapter", "planted", "--data", str(TIDES)],
        ["export", "planted", "--format", "hf", "--out", "exported"],
        ["merge", "planted", "planted2", "--into-adapter", "both"],
    ],
    ids=["generate", "merge", "eval", "export", "combine"],
)
def test_an_adapter_file_cannot_switch_on_remote_code(store, planted, tmp_path, verb):
    res = run_cli(*verb, "--store", str(store), cwd=tmp_path)
    assert res.returncode == 2, out(res)
    assert "Traceback" not in out(res)
    assert "'planted'" in res.stderr and "--trust-remote-code" in res.stderr, res.stderr
    assert not planted.exists(), "the model's code ran"
    assert not (tmp_path / "merged").exists() and not (tmp_path / "exported").exists()
    assert not (store / "both").exists()


def test_remote_code_runs_when_the_command_line_asks(store, planted, tmp_path):
    res = run_cli(
        "generate", "--adapter", "planted", "hello", "--max-new-tokens", "2", "--trust-remote-code",
        "--store", str(store), cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, out(res)
    assert planted.read_text() == "model code ran"


def test_the_python_api_refuses_it_too(store, planted):
    with pytest.raises(LorakitError, match="--trust-remote-code"):
        load(store, "planted")
    assert not planted.exists()


# --- the run folder: only lorakit's own files are replaced -----------------------------------------------------


def test_a_new_run_keeps_files_it_did_not_make(tiny_llama, tmp_path):
    run_dir = tmp_path / "runs" / "tiny"
    (run_dir / "notes").mkdir(parents=True)
    (run_dir / "notes" / "ideas.md").write_text("my notes")
    (run_dir / "plot.png").write_bytes(b"not lorakit's")
    (run_dir / "metrics.jsonl").write_text('{"step": 99, "loss": 9.0}\n')  # an earlier run's log
    train(validate_recipe(recipe_in(tmp_path, tiny_llama, max_steps=2, logging_every=1), "test"), say=lambda _: None)
    assert (run_dir / "notes" / "ideas.md").read_text() == "my notes"
    assert (run_dir / "plot.png").read_bytes() == b"not lorakit's"
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert 99 not in steps and 2 in steps  # the old log was replaced, not appended to


def test_a_run_folder_that_is_a_file_is_refused(tiny_llama, tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "tiny").write_text("precious")
    with pytest.raises(LorakitError, match="is a file, not a folder"):
        train(validate_recipe(recipe_in(tmp_path, tiny_llama), "test"), say=lambda _: None)
    assert (tmp_path / "runs" / "tiny").read_text() == "precious"


# --- one run per adapter name --------------------------------------------------------------------------------


def test_lock_names_its_holder_and_is_free_once_released(tmp_path):
    path = tmp_path / ".lock"
    with held_lock(path, "work"):
        assert lock_holder(path)["pid"] == os.getpid()
    assert lock_holder(path) is None
    path.write_text(json.dumps({"pid": 999999, "command": "lorakit train old.yaml"}))  # left by a killed process
    with held_lock(path, "work"):  # taken over
        assert lock_holder(path)["pid"] == os.getpid()


def test_a_second_run_of_the_same_adapter_is_refused_at_once(tiny_llama, tmp_path):
    """Two terminals, one adapter name: the second run stops before touching the first one's files."""
    write_recipe(tmp_path, recipe_in(tmp_path, tiny_llama, max_steps=2000, logging_every=1, save_every=100000))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    metrics = tmp_path / "runs" / "tiny" / "metrics.jsonl"
    with (tmp_path / "first.txt").open("w") as log:
        first = subprocess.Popen(
            [sys.executable, "-m", "lorakit.cli", "train", "recipe.yaml"], cwd=tmp_path, stdout=log, stderr=log, env=env
        )
    try:
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().count('"loss"') >= 2):
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.txt").read_text()
            time.sleep(0.1)
        second = run_cli("train", "recipe.yaml", "--overwrite", cwd=tmp_path)
        assert first.poll() is None, "the first run did not outlast the second's start: make it longer"
        assert second.returncode == 2, out(second)
        assert "Traceback" not in out(second)
        assert f"process {first.pid}" in second.stderr and "already running" in second.stderr, second.stderr
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        assert rows[0]["step"] == 1 or "eval_loss" in rows[0]  # the first run's early steps are all still there
        assert [r["step"] for r in rows if "loss" in r] == list(range(1, len([r for r in rows if "loss" in r]) + 1))
    finally:
        first.kill()
        first.wait()


# --- resuming keeps the run's history and the user's settings ------------------------------------------------


def test_trim_metrics_keeps_steps_up_to_the_checkpoint_and_sums_their_loss(tmp_path):
    rows = [
        {"step": 0, "eval_loss": 3.0},
        {"step": 2, "loss": 2.0},
        {"step": 4, "loss": 1.0},
        {"step": 6, "loss": 0.5},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "lo')
    assert trim_metrics(tmp_path, 4) == (pytest.approx(2.0 * 2 + 1.0 * 2), 4)
    assert trim_metrics(tmp_path / "none", 4) == (0.0, 0)
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == rows[:3]


def start_then_kill(tmp_path: Path, args: list[str], logged: int) -> None:
    """Run `lorakit train ...` until `logged` steps are in its log, then kill it with SIGKILL (no checkpoint, no
    clean-up: as a crash or an out-of-memory killer would)."""
    metrics = tmp_path / "runs" / "tiny" / "metrics.jsonl"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    with (tmp_path / "killed.txt").open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lorakit.cli", "train", *args], cwd=tmp_path, stdout=log,
                                stderr=log, env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().count('"loss"') >= logged):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.txt").read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()


def test_resume_after_kill_9_with_overwrite_and_overrides(store, tiny_llama, tmp_path):
    """A run started with --overwrite and --set, killed with SIGKILL: the resume hint carries the overrides, the
    resumed run may replace the adapter as the first one was told to, the log has each step once, and the train
    loss reported covers every step of the run, not just the resumed ones."""
    body = recipe_in(tmp_path, tiny_llama, max_steps=400, logging_every=1, save_every=4)
    write_recipe(tmp_path, body)
    shutil.copytree(store / "good", tmp_path / "adapters" / "tiny")  # an adapter of that name exists already
    before = (tmp_path / "adapters" / "tiny" / "adapter_model.safetensors").read_bytes()
    start_then_kill(tmp_path, ["recipe.yaml", "--overwrite", "--set", "train.seed=3"], logged=10)
    run_dir = tmp_path / "runs" / "tiny"
    done = checkpoints(run_dir)
    assert done, "no complete checkpoint before the kill"
    resumed_at = int(done[-1].name.split("-")[1])
    assert (tmp_path / "adapters" / "tiny" / "adapter_model.safetensors").read_bytes() == before

    res = run_cli("train", "recipe.yaml", "--set", "train.seed=3", "--resume",
                  "--set", f"train.max_steps={resumed_at + 3}", cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, out(res)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "loss" in r]
    assert [r["step"] for r in trained] == list(range(1, resumed_at + 4))  # each step once, none lost
    meta = read_meta(tmp_path / "adapters", "tiny")
    assert meta["metrics"]["steps"] == resumed_at + 3
    whole_run = sum(r["loss"] for r in trained) / len(trained)
    assert meta["metrics"]["train_loss"] == pytest.approx(whole_run, rel=1e-4)
    assert meta["recipe"]["train"]["seed"] == 3
    assert (tmp_path / "adapters" / "tiny" / "adapter_model.safetensors").read_bytes() != before


def test_resume_hint_keeps_the_overrides(tiny_llama, tmp_path):
    write_recipe(tmp_path, recipe_in(tmp_path, tiny_llama, max_steps=400, logging_every=1, save_every=1000))
    metrics = tmp_path / "runs" / "tiny" / "metrics.jsonl"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    args = ["train", "recipe.yaml", "--set", "train.seed=5", "--set", "data.block_size=32"]
    proc = subprocess.Popen([sys.executable, "-m", "lorakit.cli", *args], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**env, "COLUMNS": "300"})  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().count('"loss"') >= 2):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, stderr
    step = int(re.search(r"interrupted at step (\d+)", stderr).group(1))
    hint = re.search(r"resume with: (.+)", stderr)
    assert hint, stderr
    command = shlex.split(hint.group(1))
    assert command[:3] == ["lorakit", "train", "recipe.yaml"] and command[-1] == "--resume"
    assert "--set=train.seed=5" in command and "--set=data.block_size=32" in command
    res = run_cli(*command[1:], "--set", f"train.max_steps={step + 2}", cwd=tmp_path)  # the hint, as given, resumes
    assert res.returncode == 0, out(res)
    assert "resuming from" in out(res)


def test_lock_file_is_not_an_adapter_or_a_checkpoint(tmp_path):
    run_dir = tmp_path / "runs" / "x"
    with held_lock(run_dir / LOCK_FILE, "work"):
        assert checkpoints(run_dir, complete_only=False) == []
