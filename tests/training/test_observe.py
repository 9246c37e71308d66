"""Watching a run: TensorBoard event files that read back equal to metrics.jsonl, one plain progress line per
logging step when the output is not a terminal, and a tracker whose package is missing found before loading."""

from __future__ import annotations

import json

import pytest

from conftest import TIDES, run_cli, tiny_recipe, write_recipe


def test_tensorboard_scalars_equal_the_run_log_and_plain_lines_per_step(tiny_llama, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    body = tiny_recipe(tiny_llama, TIDES, train={"max_steps": 4, "report_to": ["tensorboard"]})
    res = run_cli("train", str(write_recipe(tmp_path, body)), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    lines = [x for x in res.stdout.splitlines() if x.startswith("step ") and " loss " in x and "eval loss" not in x]
    assert [line.split()[1] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]  # piped: a line per logging step
    for line in lines:
        assert all(f in line for f in ("epoch ", "smoothed ", "lr ", "tok/s", "peak ")), line
    assert "eta " in lines[-2]
    rows = [json.loads(x) for x in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    events = EventAccumulator(str(tmp_path / "runs" / "tiny" / "tensorboard"))
    events.Reload()
    board = {e.step: e.value for e in events.Scalars("train/loss")}
    assert board.keys() == losses.keys() and len(board) == 4
    for step, value in losses.items():
        assert abs(board[step] - value) <= 1e-6 * max(1.0, abs(value))
    lrs = {e.step: e.value for e in events.Scalars("train/learning_rate")}
    assert all(abs(lrs[r["step"]] - r["learning_rate"]) <= 1e-9 for r in rows if "learning_rate" in r)


def test_a_tracker_that_is_not_installed_is_a_recipe_error(tiny_llama, tmp_path):
    body = tiny_recipe(tiny_llama, TIDES, train={"report_to": ["tensorboard", "dvclive"]})
    recipe = write_recipe(tmp_path, body)
    for args in (("recipe", "validate", str(recipe)), ("train", str(recipe))):
        res = run_cli(*args, cwd=tmp_path)
        assert res.returncode == 2, res.stdout + res.stderr
        said = " ".join(res.stderr.split())
        assert "train.report_to.1: dvclive is not installed; pip install 'lorakit[dvclive]'" in said
        assert "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists()  # found before anything was loaded or written


def png_size(path) -> tuple[int, int]:
    import struct

    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_run_history_plots_and_the_model_card(tiny_llama, tmp_path, monkeypatch):
    import os
    import signal
    import subprocess
    import sys
    import time

    import transformers

    from lorakit.recipe import validate_recipe
    from lorakit.training.run import train

    runs, store = tmp_path / "runs", tmp_path / "adapters"

    def body(name, **train_):
        b = tiny_recipe(tiny_llama, TIDES, train=train_)
        b["output"] = {"name": name, "store": str(store), "runs_dir": str(runs)}
        return b

    # completed, through the CLI
    done = run_cli("train", str(write_recipe(tmp_path, body("done", max_steps=4), "done.yaml")), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "loss curve:" in done.stdout and "perplexity" in done.stdout
    card = (store / "done" / "README.md").read_text()
    assert "](loss.png)" in card and png_size(store / "done" / "loss.png") == (900, 500)
    # interrupted: killed (-9) after its second checkpoint; seen running first
    recipe = write_recipe(tmp_path, body("killed", max_steps=400, save_every=2), "killed.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "lorakit.cli", "train", str(recipe)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 300
        while not (runs / "killed" / "checkpoint-4" / ".complete").exists() and time.time() < deadline:
            time.sleep(0.2)
        running = json.loads(run_cli("runs", "list", "--json", "--runs-dir", str(runs), cwd=tmp_path).stdout)
        assert {r["name"]: (r["status"], r["pid"]) for r in running}["killed"] == ("running", proc.pid)
        refused = run_cli("runs", "rm", "killed", "--yes", "--runs-dir", str(runs), cwd=tmp_path)
        assert refused.returncode == 2 and "is running" in refused.stderr
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    # failed: an error inside a training step
    def boom(*a, **k):
        raise RuntimeError("boom in step")

    monkeypatch.setattr(transformers.Trainer, "training_step", boom)
    with pytest.raises(RuntimeError, match="boom in step"):
        train(validate_recipe(body("broken", max_steps=4), "t"), say=lambda *_: None, command=["lorakit", "train"])
    rows = {
        r["name"]: r
        for r in json.loads(run_cli("runs", "list", "--json", "--runs-dir", str(runs), cwd=tmp_path).stdout)
    }
    assert rows["done"]["status"] == "completed" and rows["done"]["adapter"] == str(store / "done")
    assert rows["done"]["steps"] == rows["done"]["total_steps"] == 4 and rows["done"]["best_eval_loss"] is not None
    k = rows["killed"]
    assert k["status"] == "interrupted" and k["steps"] >= 4 and k["total_steps"] == 400
    assert (
        k["resume"] == f"lorakit train {recipe} --resume"
        and k["checkpoint"].endswith("checkpoint-4") is False
        or k["checkpoint"]
    )
    assert rows["broken"]["status"] == "failed" and "boom in step" in rows["broken"]["reason"]
    shown = run_cli("runs", "show", "killed", "--runs-dir", str(runs), cwd=tmp_path)
    assert f"resume with: lorakit train {recipe} --resume" in " ".join(shown.stdout.split())
    gone = run_cli("runs", "rm", "broken", "--yes", "--runs-dir", str(runs), cwd=tmp_path)
    assert gone.returncode == 0 and not (runs / "broken").exists()
    # the plot: two runs on one chart, from a run and from an adapter's kept log
    out = tmp_path / "cmp.png"
    res = run_cli(
        "plot", "killed", "done", "--out", str(out), "--runs-dir", str(runs), "--store", str(store), cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
    assert png_size(out) == (900, 500)
    bad = run_cli("plot", "nothing", "--runs-dir", str(runs), "--store", str(store), cwd=tmp_path)
    assert bad.returncode == 2 and "no run log" in bad.stderr
