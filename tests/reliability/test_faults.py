"""A merge or an export killed with SIGKILL at a random moment: where the output goes there is either the complete
old output or the complete new one, never a half-written model; the next write there cleans up what the kill left."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import RECIPES, run_cli, tiny_recipe
from lorakit.recipe import validate_recipe
from lorakit.training.run import train

TIDES = RECIPES / "data" / "tides.txt"
KILLS = 4  # random moments per command


def digest(path: Path) -> dict[str, str]:
    """What makes an output the same: every file's content, except the merge report's timing."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {
        str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in files
        if p.name != "lorakit-merge.json"
    }


@pytest.fixture(scope="module")
def two_adapters(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    for name, seed in (("old", 1), ("new", 2)):
        body = tiny_recipe(tiny_llama, TIDES, data={"eval_split": 0}, train={"max_steps": 2, "seed": seed})
        body["output"] = {"name": name, "store": str(root / "adapters"), "runs_dir": str(root / "runs")}
        train(validate_recipe(body, "test"), say=lambda _: None)
    return root


COMMANDS = {
    "merge": (["merge", "{name}", "--out", "out"], "out"),
    "export hf": (["export", "{name}", "--format", "hf", "--out", "out"], "out"),
    "export gguf": (["export", "{name}", "--format", "gguf", "--out", "out.gguf"], "out.gguf"),
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_killed_write_leaves_the_old_or_the_new_output(two_adapters, tmp_path, command):
    args, target = COMMANDS[command]
    work = tmp_path / "work"
    shutil.copytree(two_adapters / "adapters", work / "adapters")

    def argv(name: str) -> list[str]:
        return [a.format(name=name) for a in args] + ["--store", "adapters", "--overwrite"]

    started = time.monotonic()
    res = run_cli(*argv("new"), cwd=work)
    took = time.monotonic() - started
    assert res.returncode == 0, res.stdout + res.stderr
    new = digest(work / target)
    res = run_cli(*argv("old"), cwd=work)
    assert res.returncode == 0, res.stdout + res.stderr
    old = digest(work / target)
    assert old != new

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    rng = random.Random(0)
    seen = set()
    for _ in range(KILLS):
        proc = subprocess.Popen([sys.executable, "-m", "lorakit.cli", *argv("new")], cwd=work,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)  # fmt: skip
        time.sleep(rng.uniform(0.3, took))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        now = digest(work / target)
        assert now in (old, new), f"{target} is neither the old nor the new output after a kill"
        seen.add("new" if now == new else "old")
        if now == new:  # put the old one back for the next kill
            res = run_cli(*argv("old"), cwd=work)
            assert res.returncode == 0, res.stdout + res.stderr
    # whatever the kills left behind (hidden temporary siblings), a finished write there leaves the folder clean
    for p in work.iterdir():
        if p.name.startswith("."):
            os.utime(p, (0, 0))  # as if an hour old: no other process can still be writing it
    res = run_cli(*argv("new"), cwd=work)
    assert res.returncode == 0, res.stdout + res.stderr
    assert digest(work / target) == new
    assert sorted(p.name for p in work.iterdir()) == sorted(["adapters", target])
