"""Two processes (DDP on the CPU, gloo): one adapter, one set of run files, the weights of one process.

Launched as users launch them: `accelerate launch --config_file examples/multi-gpu/ddp.yaml` and
`torchrun`, each running the real `lorakit` command.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import RECIPES, ROOT, tiny_recipe, write_recipe
from lorakit.errors import LorakitError
from lorakit.recipe import validate_recipe
from lorakit.training.checkpoints import MARKER, RUN_FILE, checkpoints, step_of
from lorakit.training.run import check_launch, train

TIDES = RECIPES / "data" / "tides.txt"
EXAMPLES = ROOT / "examples" / "multi-gpu"
CLI = ["-m", "lorakit.cli", "train"]

# Each optimizer step sees the same four blocks in both runs: the sampler deals consecutive
# micro-batches of one seeded order to the processes in turn, and one process with gradient
# accumulation 2 takes the same micro-batches in the same order; both normalise the loss by the
# step's token count over all micro-batches. Only the order of float additions in the gradient
# average can differ (all-reduce vs accumulation). Measured here: bit-identical (max difference
# 0.0). Processes that do not exchange gradients end ~1e-2 apart on the same run, 4 orders of
# magnitude outside this tolerance.
RTOL, ATOL = 1e-5, 1e-7


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    # One thread per process: two processes share this machine's two cores with other work.
    return {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", *CLI, *args]


def accelerate_ddp(*args: str) -> list[str]:
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(EXAMPLES / "ddp.yaml")]
    return [*launch, "--num_processes", "2", "--main_process_port", str(free_port()), *CLI, *args]


def comparable(model_dir: Path, root: Path, name: str, **train_section) -> dict:
    """Plain SGD at a constant rate and no dropout: two runs over the same batches end with the same weights."""
    body = tiny_recipe(
        model_dir,
        TIDES,
        lora={"r": 4, "dropout": 0.0},
        train={"max_steps": 4, "optimizer": "sgd", "learning_rate": 0.5, "scheduler": "constant",
               "warmup_ratio": 0.0, "batch_size": 2, **train_section},
    )  # fmt: skip
    body["output"] = {"name": name, "store": str(root / "adapters"), "runs_dir": str(root / "runs")}
    return body


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ddp_and_single(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    recipe = write_recipe(root, comparable(tiny_llama, root, "tiny"))
    proc = subprocess.run(accelerate_ddp(str(recipe)), cwd=root, capture_output=True, text=True, timeout=300, env=env())
    single_root = tmp_path_factory.mktemp("single")
    single = train(validate_recipe(comparable(tiny_llama, single_root, "tiny", gradient_accumulation=2), "single"))
    return root, proc, single_root, single


def test_two_processes_write_one_adapter_and_one_set_of_run_files(ddp_and_single, tiny_llama):
    root, proc, _, _ = ddp_and_single
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "saved adapter 'tiny'" in proc.stdout
    # The store holds the adapter and nothing else (no temporary folder of a second writer).
    assert [p.name for p in (root / "adapters").iterdir()] == ["tiny"]
    adapter = root / "adapters" / "tiny"
    assert {"adapter_config.json", "adapter_model.safetensors", "lorakit.json", "README.md"} <= {
        p.name for p in adapter.iterdir()
    }
    meta = json.loads((adapter / "lorakit.json").read_text())
    assert meta["metrics"]["steps"] == 4
    # The run: one run.json, one metrics log with each step once; checkpoints and staging gone.
    run_dir = root / "runs" / "tiny"
    assert sorted(p.name for p in run_dir.iterdir() if p.name != ".lock") == ["metrics.jsonl", "run.json"]
    run = json.loads((run_dir / RUN_FILE).read_text())
    assert run["recipe"]["lora"]["dropout"] == 0.0
    assert run["eval_loss_before"] == pytest.approx(meta["metrics"]["eval_loss_before"])
    log = rows(run_dir)
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in log if "eval_loss" in r] == [0, 4]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(adapter))
    weights = load_file(adapter / "adapter_model.safetensors")
    loaded = {k.replace(".default", ""): v for k, v in peft.state_dict().items() if "lora_" in k}
    assert loaded.keys() == weights.keys()
    for k in weights:
        torch.testing.assert_close(loaded[k], weights[k])


def test_two_processes_train_like_one_with_the_same_global_batch(ddp_and_single):
    root, proc, single_root, single = ddp_and_single
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = load_file(root / "adapters" / "tiny" / "adapter_model.safetensors")
    one = load_file(single.path / "adapter_model.safetensors")
    assert ddp.keys() == one.keys()
    # Training moved every LoRA B away from its zero start, so the comparison is not trivial.
    assert all(one[k].abs().max() > 1e-5 for k in one if "lora_B" in k)
    for k in one:
        torch.testing.assert_close(ddp[k], one[k], rtol=RTOL, atol=ATOL, msg=k)
    meta = json.loads((root / "adapters" / "tiny" / "lorakit.json").read_text())
    assert meta["metrics"]["train_tokens_seen"] == single.metrics["train_tokens_seen"]
    ddp_loss = {r["step"]: r["loss"] for r in rows(root / "runs" / "tiny") if "loss" in r}
    one_loss = {r["step"]: r["loss"] for r in rows(single_root / "runs" / "tiny") if "loss" in r}
    assert ddp_loss == pytest.approx(one_loss, rel=RTOL)


def wait_for_steps(run_dir: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        log = run_dir / "metrics.jsonl"
        if log.is_file() and sum('"loss"' in line for line in log.read_text().splitlines()) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"training did not reach step {n}")


def test_ctrl_c_under_torchrun_checkpoints_every_process_then_resumes(tiny_llama, tmp_path):
    body = tiny_recipe(tiny_llama, TIDES, train={"max_steps": 100_000, "save_every": 100_000})
    body["output"] = {"name": "long", "store": str(tmp_path / "adapters"), "runs_dir": str(tmp_path / "runs")}
    recipe = write_recipe(tmp_path, body)
    run_dir = tmp_path / "runs" / "long"
    # Its own session, as a terminal's Ctrl-C reaches the launcher (which passes it on to the processes).
    proc = subprocess.Popen(
        torchrun(str(recipe)), cwd=tmp_path, env=env(), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_steps(run_dir, 2, proc)
        proc.send_signal(signal.SIGINT)
        out, errors = proc.communicate(timeout=90)  # both processes stop together: no one waits forever
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "interrupted at step" in errors, out[-2000:] + errors[-2000:]
    done = checkpoints(run_dir)
    assert len(done) == 1
    ckpt = done[0]
    names = {p.name for p in ckpt.iterdir()}
    assert {MARKER, RUN_FILE, "rng_state_0.pth", "rng_state_1.pth", "optimizer.pt"} <= names
    assert checkpoints(run_dir, complete_only=False) == done  # no unmarked checkpoint folder left
    assert not (tmp_path / "adapters" / "long").exists()

    stopped_at = step_of(ckpt)
    resumed = subprocess.run(
        torchrun(str(recipe), "--resume", "--set", f"train.max_steps={stopped_at + 2}"),
        cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    meta = json.loads((tmp_path / "adapters" / "long" / "lorakit.json").read_text())
    assert meta["metrics"]["steps"] == stopped_at + 2
    steps = [r["step"] for r in rows(run_dir) if "loss" in r]
    assert steps[-2:] == [stopped_at + 1, stopped_at + 2]
    assert not checkpoints(run_dir, complete_only=False)


def launcher_env(config: str) -> dict[str, str]:
    """The environment `accelerate launch --config_file <config>` gives each process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    argv = ["--config_file", str(EXAMPLES / config), "--num_processes", "2", *CLI, "recipe.yaml"]
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = list(defaults.deepspeed_config)
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


@pytest.mark.parametrize(
    ("config", "refused"),
    [("ddp.yaml", False), ("fsdp.yaml", True), ("deepspeed-zero2.yaml", False), ("deepspeed-zero3.yaml", True)],
)
def test_launch_configs_and_quantized_bases(config, refused, tiny_llama, tmp_path, monkeypatch):
    """Every shipped config is one accelerate reads; weight-sharding ones refuse a 4-bit base before loading it."""
    for key, value in launcher_env(config).items():
        monkeypatch.setenv(key, value)
    recipe = validate_recipe(tiny_recipe(tiny_llama, TIDES, base_model={"quantization": "4bit"}), "q")
    if refused:
        with pytest.raises(LorakitError, match="cannot be combined with (FSDP|DeepSpeed ZeRO-3).*ddp.yaml"):
            check_launch(recipe)
    else:
        check_launch(recipe)


def test_the_examples_readme_names_every_config():
    text = (EXAMPLES / "README.md").read_text()
    for config in sorted(EXAMPLES.glob("*.yaml")):
        assert f"--config_file examples/multi-gpu/{config.name}" in text, config.name
