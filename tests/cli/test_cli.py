"""The `lorakit` command as a user runs it: real subprocesses, exit codes, messages, files.

Every subprocess that imports torch costs seconds, so one tiny adapter is trained once per module
and shared, and independent runs that fail early are started side by side.
"""

from __future__ import annotations

import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import RECIPES, read_meta, run_cli, tiny_recipe, write_recipe

TIDES = RECIPES / "data" / "tides.txt"
EXIT_INPUT = 2


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_subprocess():
    """Tiny models gain nothing from intra-op threads, and these runs share few cores (side by side,
    or with other work): OpenMP's default thread per core then stalls them, measured 2-3x slower."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


def out(res) -> str:
    return res.stdout + res.stderr


def squash(text: str) -> str:
    """Drop all whitespace: rich wraps (and folds long paths) at the terminal width."""
    return "".join(text.split())


def assert_says(res, *needles: str) -> None:
    text = squash(out(res))
    for needle in needles:
        assert squash(needle) in text, f"{needle!r} not in output:\n{out(res)}"


def assert_user_error(res, *needles: str) -> None:
    """Exit 2 with a message naming the problem, never a traceback."""
    assert res.returncode == EXIT_INPUT, out(res)
    assert "Traceback" not in out(res), out(res)
    assert_says(res, *needles)


def run_side_by_side(jobs: dict[str, tuple], workers: int = 2) -> dict[str, object]:
    """Run `run_cli(*args, cwd=cwd)` for each job concurrently; subprocess.run releases the GIL."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {key: pool.submit(run_cli, *args, cwd=cwd) for key, (args, cwd) in jobs.items()}
        return {key: f.result() for key, f in futures.items()}


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def sections(stdout: str) -> dict[str, str]:
    """Split `generate` output at its rules (`──── label ────`) into {label: text}."""
    parts: dict[str, str] = {}
    label = None
    for line in stdout.splitlines():
        m = re.fullmatch(r"─+ (.+?) ─+", line.strip())
        if m:
            label = m.group(1)
            parts[label] = ""
        elif label is not None:
            parts[label] += line + "\n"
    return parts


# --- training ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory):
    """`lorakit train recipe.yaml` once: adapter 'tiny' in <work>/adapters, run in <work>/runs."""
    work = tmp_path_factory.mktemp("cli")
    # a high learning rate, so that the adapter visibly changes greedy output
    write_recipe(work, tiny_recipe(tiny_llama, TIDES, train={"max_steps": 8, "learning_rate": 2e-2}))
    res = run_cli("train", "recipe.yaml", cwd=work)
    return work, res


def test_train_writes_the_adapter_and_reports(trained, tiny_llama):
    work, res = trained
    assert res.returncode == 0, out(res)
    assert "Traceback" not in out(res)
    assert "target modules: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in res.stdout
    assert re.search(r"^eval loss \d+\.\d{4} -> \d+\.\d{4} \(perplexity [\d.]+ -> [\d.]+\)$", res.stdout, re.M), (
        res.stdout
    )
    assert_says(res, f"saved adapter 'tiny' to {work / 'adapters' / 'tiny'} (8 steps")
    config = json.loads((work / "adapters" / "tiny" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == str(tiny_llama)
    rows = [json.loads(line) for line in (work / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    losses = [row for row in rows if "loss" in row]
    assert [row["step"] for row in losses] == list(range(1, 9))
    assert all(row["loss"] > 0 for row in losses)
    assert read_meta(work / "adapters", "tiny")["metrics"]["steps"] == 8


GEN = ("generate", "--temperature", "0", "--max-new-tokens", "5")


@pytest.fixture(scope="module")
def after_training(trained, tiny_llama):
    """The runs that use the trained adapter without writing one, side by side; and its bytes before."""
    work, res = trained
    assert res.returncode == 0, out(res)
    before = snapshot(work / "adapters" / "tiny")
    jobs = {
        "train-again": (("train", "recipe.yaml"), work),
        "adapter": ((*GEN, "--adapter", "tiny", "At Harrow"), work),
        "compare": ((*GEN, "--adapter", "tiny", "--compare", "At Harrow"), work),
        "base-only": ((*GEN, "--base-only", "--base", str(tiny_llama), "At Harrow"), work),
        "nope": ((*GEN, "--adapter", "nope", "At Harrow"), work),
        "neither": ((*GEN, "At Harrow"), work),
    }
    return before, run_side_by_side(jobs)


def test_train_again_needs_overwrite(trained, after_training):
    work, _ = trained
    before, runs = after_training
    assert_user_error(runs["train-again"], "adapter 'tiny' already exists", "--overwrite")
    assert snapshot(work / "adapters" / "tiny") == before


def test_set_overrides_steps_and_name(trained):
    work, _ = trained
    before = snapshot(work / "adapters" / "tiny")
    res = run_cli("train", "recipe.yaml", "--set", "train.max_steps=2", "--set", "output.name=tiny2", cwd=work)
    assert res.returncode == 0, out(res)
    assert_says(res, "saved adapter 'tiny2'", "(2 steps")
    meta = read_meta(work / "adapters", "tiny2")
    assert meta["metrics"]["steps"] == 2 and meta["recipe"]["train"]["max_steps"] == 2
    assert (work / "adapters" / "tiny2" / "adapter_model.safetensors").is_file()
    assert snapshot(work / "adapters" / "tiny") == before  # the recipe's own adapter is untouched


def test_shipped_gpt2_recipe_trains_offline(tiny_gpt2, tmp_path):
    shutil.copy(RECIPES / "gpt2.yaml", tmp_path)
    shutil.copytree(RECIPES / "data", tmp_path / "data")
    res = run_cli(
        "train",
        "gpt2.yaml",
        "--set",
        f"base_model.name={tiny_gpt2}",
        "--set",
        "train.max_steps=2",
        "--set",
        "data.block_size=64",
        cwd=tmp_path,
    )
    assert res.returncode == 0, out(res)
    assert "target modules: c_attn, c_fc, c_proj" in res.stdout
    config = json.loads((tmp_path / "adapters" / "gpt2-tides" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    assert set(config["target_modules"]) == {"c_attn", "c_fc", "c_proj"}
    meta = read_meta(tmp_path / "adapters", "gpt2-tides")
    assert meta["metrics"]["steps"] == 2 and meta["base_model"]["reference"] == str(tiny_gpt2)
    assert meta["data"]["sources"][0]["path"] == str(tmp_path / "data" / "tides.txt")


# --- bad input that needs the model's config or the data ----------------------------------------

ONE_LINE = "At Harrow Sound the spring tide turns twice a day.\n"

# id: (recipe sections, {file name: bytes} to write, needles; "{dir}" is the case's folder)
BAD_DATA = {
    "missing-data": ({}, {}, ["data source not found:", "{dir}/tides.txt"]),
    "empty-data": ({}, {"tides.txt": b""}, ["{dir}/tides.txt: no usable text in this source"]),
    "less-than-a-block": (
        {"data": {"block_size": 512}},
        {"tides.txt": ONE_LINE.encode()},
        ["less than one block (data.block_size=512)"],
    ),
    "not-utf8": (
        {},
        {"tides.txt": "Marée haute à Harrow.\n".encode("latin-1")},
        ["{dir}/tides.txt: not UTF-8 text (byte 0xe9 at line 1"],
    ),
    "unknown-target": (
        {"lora": {"target_modules": ["nope"]}},
        {"tides.txt": TIDES.read_bytes()},
        ["lora.target_modules: nope match no layer of this model", "candidates:", "q_proj", "v_proj"],
    ),
    "4bit-gpt2": (
        {"base_model": {"quantization": "4bit"}},
        {"tides.txt": TIDES.read_bytes()},
        ["base_model.quantization 4bit", "Conv1D"],
    ),
}


@pytest.fixture(scope="module")
def bad_data_runs(tiny_llama, tiny_gpt2, tmp_path_factory):
    jobs = {}
    for case, (sections_, files, _) in BAD_DATA.items():
        d = tmp_path_factory.mktemp(case)
        for name, data in files.items():
            (d / name).write_bytes(data)
        model = tiny_gpt2 if case == "4bit-gpt2" else tiny_llama
        write_recipe(d, tiny_recipe(model, d / "tides.txt", **sections_))
        jobs[case] = (("train", "recipe.yaml"), d)
    results = run_side_by_side(jobs)
    return {case: (jobs[case][1], res) for case, res in results.items()}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_a_message_and_writes_nothing(bad_data_runs, case):
    d, res = bad_data_runs[case]
    assert_user_error(res, *(n.format(dir=d) for n in BAD_DATA[case][2]))
    assert not (d / "adapters").exists() and not (d / "runs").exists()


# --- bad recipes: rejected before anything is loaded -------------------------------------------

BAD_RECIPES = [
    pytest.param(
        "recipe.yaml", {"output": {"name": "../evil"}}, ["output.name: invalid adapter name '../evil'"], id="name"
    ),
    pytest.param("recipe.yaml", "lora:\n  r: 4\n   alpha: 8\n", ["YAML syntax error at line 3, column 9"], id="yaml"),
    pytest.param("recipe.yaml", {"lora": {"rr": 8}}, ["lora.rr: unknown key (did you mean 'r'?)"], id="unknown-key"),
    pytest.param("recipe.yaml", {"lora": {"r": 0}}, ["lora.r: Input should be greater than 0, got 0"], id="r0"),
    pytest.param(
        "recipe.yaml", {"lora": {"dropout": 1.0}}, ["lora.dropout: Input should be less than 1"], id="dropout"
    ),
    # error text is not rich markup: '[v2]' in a path is no style tag
    pytest.param("tides[v2].yaml", {"lora": {"r": 0}}, ["tides[v2].yaml: 1 problem"], id="brackets-in-file-name"),
]


@pytest.mark.parametrize("command", [("recipe", "validate"), ("train",)], ids=["validate", "train"])
@pytest.mark.parametrize(("file_name", "body", "needles"), BAD_RECIPES)
def test_bad_recipe_fails_before_loading_anything(tiny_llama, tmp_path, monkeypatch, command, file_name, body, needles):
    path = tmp_path / file_name
    if isinstance(body, str):
        path.write_text(body)
    else:
        write_recipe(tmp_path, tiny_recipe(tiny_llama, TIDES, **body), name=file_name)
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")  # stderr lists every module imported
    res = run_cli(*command, file_name, cwd=tmp_path)
    imported = {line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")}
    assert "pydantic" in imported  # the listing works
    assert not {"torch", "transformers", "peft"} & imported
    res.stderr = "\n".join(line for line in res.stderr.splitlines() if not line.startswith("import time:"))
    assert_user_error(res, "1 problem", *needles)
    assert not (tmp_path / "adapters").exists() and not (tmp_path / "runs").exists()


# --- generate ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generations(after_training):
    return after_training[1]


def test_generate_with_the_adapter(generations):
    res = generations["adapter"]
    assert res.returncode == 0, out(res)
    parts = sections(res.stdout)
    assert list(parts) == ["adapter tiny"]
    assert parts["adapter tiny"].strip()  # five greedy tokens from a random model: some text


def test_generate_compare_shows_base_then_adapter(generations):
    res = generations["compare"]
    assert res.returncode == 0, out(res)
    parts = sections(res.stdout)
    assert list(parts) == ["base model", "adapter tiny"]
    # greedy decoding: each half is exactly what the single runs print
    assert parts["adapter tiny"] == sections(generations["adapter"].stdout)["adapter tiny"]
    assert parts["base model"] == sections(generations["base-only"].stdout)["base model"]
    assert parts["adapter tiny"] != parts["base model"]  # the base half really runs without the adapter


def test_generate_base_only(generations):
    res = generations["base-only"]
    assert res.returncode == 0, out(res)
    parts = sections(res.stdout)
    assert list(parts) == ["base model"] and parts["base model"].strip()


def test_generate_needs_an_adapter_or_base_only(generations):
    assert_user_error(generations["neither"], "name an adapter with --adapter NAME, or pass --base-only")


def test_generate_unknown_adapter(generations):
    assert_user_error(generations["nope"], "no adapter 'nope' in", "(adapters: tiny")


# --- listing and help -------------------------------------------------------------------------


def test_adapters_list_json(trained, tiny_llama):
    work, _ = trained
    res = run_cli("adapters", "list", "--json", cwd=work)
    assert res.returncode == 0, out(res)
    rows = {row["name"]: row for row in json.loads(res.stdout)}
    tiny = rows["tiny"]
    assert tiny["method"] == "LoRA" and tiny["r"] == 4 and tiny["base_model"] == str(tiny_llama)
    assert tiny["size"] > 0 and isinstance(tiny["eval_loss"], float)


def test_adapters_list_table(trained):
    work, _ = trained
    res = run_cli("adapters", "list", cwd=work)
    assert res.returncode == 0, out(res)
    assert re.search(r"│ tiny +│", res.stdout), res.stdout
    assert "LoRA" in res.stdout


def test_adapters_list_of_an_empty_store(tmp_path):
    res = run_cli("adapters", "list", "--store", "empty", cwd=tmp_path)
    assert res.returncode == 0, out(res)
    assert_says(res, f"no adapters in {tmp_path / 'empty'}")


def test_models_list_on_a_wide_terminal(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))  # not cached: the same table everywhere
    monkeypatch.setenv("COLUMNS", "250")
    res = run_cli("models", "list", cwd=tmp_path)
    assert res.returncode == 0, out(res)
    assert re.search(r"│ embedded:smollm2-135m-instruct +│ no +│ 0 B +│ SmolLM2-135M-Instruct", res.stdout), res.stdout


def test_models_list_on_80_columns(tmp_path, monkeypatch):
    """A pipe or CI log is 80 columns wide: cells may wrap, but nothing is cut off."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))  # not cached: the same table everywhere
    monkeypatch.setenv("COLUMNS", "80")
    res = run_cli("models", "list", cwd=tmp_path)
    assert res.returncode == 0, out(res)
    assert "…" not in res.stdout, res.stdout
    first_column = "".join(line.split("│")[1].strip() for line in res.stdout.splitlines() if line.startswith("│"))
    assert first_column == "embedded:smollm2-135m-instruct", res.stdout


def test_recipe_schema(tmp_path):
    res = run_cli("recipe", "schema", cwd=tmp_path)
    assert res.returncode == 0, out(res)
    schema = json.loads(res.stdout)
    assert {"base_model", "lora", "data", "train", "output"} <= set(schema["properties"])
    assert schema["required"] == ["data"]


def test_help_lists_the_commands(tmp_path):
    res = run_cli("--help", cwd=tmp_path)
    assert res.returncode == 0, out(res)
    for command in ("train", "generate", "recipe", "models", "adapters"):
        assert re.search(rf"│ {command} ", res.stdout), res.stdout


def test_the_command_skips_teardown_but_runs_exit_handlers_and_keeps_exit_codes(tmp_path):
    """`lorakit` ends its process without Python's slow module teardown once a verb is done: output written
    through a pipe is complete, exit handlers still run, and the exit code is the verb's."""
    import subprocess
    import sys

    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('exit handlers ran', flush=True))\n"
        "sys.argv = ['lorakit', *sys.argv[1:]]\n"
        "from lorakit.cli import main\n"
        "main()\n"
        "print('not reached')\n"
    )

    def run(*args):
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)

    ok = run("adapters", "list", "--store", str(tmp_path))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.lower().splitlines() == [f"no adapters in {tmp_path}", "exit handlers ran"]
    bad = run("adapters", "show", "nope", "--store", str(tmp_path))
    assert bad.returncode == 2
    assert "error: no adapter 'nope'" in bad.stderr
    assert bad.stdout.splitlines() == ["exit handlers ran"]
    usage = run("adapters", "show")  # a usage error from the command line parser
    assert usage.returncode == 2 and "Missing argument" in usage.stderr
