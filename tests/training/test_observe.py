"""Watching a run: TensorBoard event files that read back equal to metrics.jsonl, one plain progress line per
logging step when the output is not a terminal, and a tracker whose package is missing found before loading."""

from __future__ import annotations

import json

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
