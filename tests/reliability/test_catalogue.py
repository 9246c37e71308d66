"""The catalogue of hostile inputs, run through the real command as a user would: each ends with exit code 2, a
message naming the file, key or adapter at fault, no traceback, and every file that existed before unchanged.

One class per group (chat data, saved datasets, values that pass the schema but fail later, adapters that do not fit
their base, malformed adapter files, damaged weights, an empty prompt, a tampered checkpoint). Each case works in
its own folder; the commands run two at a time."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import RECIPES, one_step_adapter, run_cli, tiny_recipe, write_recipe
from lorakit.recipe import load_recipe
from lorakit.training.callbacks import GracefulStop
from lorakit.training.checkpoints import Interrupted, checkpoints
from lorakit.training.run import train

TIDES = RECIPES / "data" / "tides.txt"
WEIGHTS = "adapter_model.safetensors"


@dataclass
class Case:
    args: list[str]  # after `lorakit`
    needles: list[str]  # each must be in the output (whitespace ignored: rich wraps long lines)


def chat_rows(d: Path, row: dict) -> list[str]:
    """A chat recipe whose data has one good conversation, then `row` on line 3."""
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    (d / "chat.jsonl").write_text(json.dumps(good) + "\n\n" + json.dumps(row) + "\n")
    return ["train", "recipe.yaml"]


def with_chat(model: Path):
    def setup(d: Path, row: dict) -> list[str]:
        sources = [{"path": "chat.jsonl", "format": "chat"}]
        write_recipe(d, tiny_recipe(model, d / "chat.jsonl", data={"sources": sources}))
        return chat_rows(d, row)

    return setup


def rewrite_weights(d: Path, change: Callable[[dict], dict]) -> None:
    path = d / "adapters" / "good" / WEIGHTS
    save_file(change(load_file(path)), path)


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def poison_checkpoint(d: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {d / 'code-ran'}",))

    ckpt = checkpoints(d / "runs" / "tiny")[-1]
    torch.save({"python": Payload()}, ckpt / "rng_state.pth")


@pytest.fixture(scope="module")
def made(tiny_llama, tmp_path_factory):
    """A trained adapter ("good") and a run interrupted with a complete checkpoint, to copy into each case."""
    root = tmp_path_factory.mktemp("catalogue-made")
    one_step_adapter(tiny_llama, root)
    shutil.rmtree(root / "runs")

    run = root / "run"
    run.mkdir()
    write_recipe(run, tiny_recipe(tiny_llama, TIDES, data={"eval_split": 0}, train={"max_steps": 6, "save_every": 2}))
    original = GracefulStop.on_step_end

    def stop_at_3(self, args, state, control, **kw):
        if state.global_step == 3 and not self.requested:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, args, state, control, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(run)
        mp.setattr(GracefulStop, "on_step_end", stop_at_3)
        with pytest.raises(Interrupted):
            train(load_recipe(run / "recipe.yaml"), say=lambda _: None)
    return root


def cases(tiny_llama: Path) -> dict[str, tuple[Callable[[Path], list[str]], list[str]]]:
    chat = with_chat(tiny_llama)
    msgs = lambda *m: {"messages": [dict(zip(("role", "content"), x, strict=True)) for x in m]}  # noqa: E731
    gen = ["generate", "--adapter", "good", "--store", "adapters"]

    def recipe_with(**train_opts):
        def setup(d):
            write_recipe(d, tiny_recipe(tiny_llama, TIDES, train=train_opts))
            return ["train", "recipe.yaml"]

        return setup

    def adapter(change, *args):
        def setup(d):
            change(d)
            return list(args)

        return setup

    def fake_dataset(d):
        (d / "saved").mkdir()
        (d / "saved" / "dataset_info.json").write_text("{}")
        (d / "saved" / "state.json").write_text('{"_data_files": "nope"}')
        write_recipe(d, tiny_recipe(tiny_llama, d / "saved", data={"sources": [{"path": "saved"}]}))
        return ["train", "recipe.yaml"]

    def text_object(d):
        (d / "rows.jsonl").write_text('{"text": "fine"}\n{"text": {"nested": 1}}\n')
        write_recipe(d, tiny_recipe(tiny_llama, d / "rows.jsonl", data={"sources": [{"path": "rows.jsonl"}]}))
        return ["train", "recipe.yaml"]

    def shapes(t):  # one layer's lora_A as if the base took 32 inputs instead of 64
        key = next(k for k in t if "q_proj.lora_A" in k)
        return {**t, key: t[key][:, :32].contiguous()}

    def rank(t):  # every tensor at rank 2, adapter_config.json still saying 4
        return {k: (v[:2] if "lora_A" in k else v[:, :2]).contiguous() for k, v in t.items()}

    def other_model(t):  # the names of another architecture
        return {k.replace("model.layers", "transformer.h"): v for k, v in t.items()}

    def truncate(d):
        path = d / "adapters" / "good" / WEIGHTS
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    def incoming(d):  # an adapter folder from elsewhere, made for another architecture, about to be imported
        shutil.copytree(d / "adapters" / "good", d / "incoming")
        path = d / "incoming" / WEIGHTS
        save_file(other_model(load_file(path)), path)
        return ["adapters", "import", "incoming", "--name", "foreign", "--store", "adapters"]

    def resume_poisoned(d):
        poison_checkpoint(d)
        return ["train", "recipe.yaml", "--resume"]

    return {
        # chat data: errors name the file, the line and the field
        "chat role not a string": (
            lambda d: chat(d, {"messages": [{"role": 1, "content": "x"}, {"role": "assistant", "content": "y"}]}),
            ["chat.jsonl: line 3: messages[0].role must be a string"],
        ),
        "chat null content": (
            lambda d: chat(d, msgs(("user", "Hi"), ("assistant", None))),
            ["chat.jsonl: line 3: messages[1].content must be a string, got null"],
        ),
        "chat starts with the assistant": (
            lambda d: chat(d, msgs(("assistant", "Hello."), ("user", "Hi"), ("assistant", "Yes."))),
            ["chat.jsonl: line 3: messages", "starts with an assistant message"],
        ),
        "chat unknown role": (
            lambda d: chat(d, msgs(("narrator", "Once"), ("assistant", "Yes."))),
            ["chat.jsonl: line 3: messages[0].role: unknown role 'narrator'"],
        ),
        "chat messages not a list": (
            lambda d: chat(d, {"messages": "Hi there"}),
            ["chat.jsonl: line 3: messages must be a non-empty list"],
        ),
        "text field an object": (text_object, ["rows.jsonl: line 2: field 'text' is a JSON object"]),
        "not really a saved dataset": (fake_dataset, ["saved", "looks like a saved dataset"]),
        # values that pass a type check but would fail after the model is loaded
        "seed beyond 2^32-1": (recipe_with(seed=2**32), ["train.seed"]),
        "absurd max_steps": (recipe_with(max_steps=10**11), ["train.max_steps"]),
        "absurd epochs": (recipe_with(epochs=1e9), ["train.epochs"]),
        "absurd batch_size": (recipe_with(batch_size=10**8), ["train.batch_size"]),
        "absurd max_new_tokens": (
            adapter(lambda d: None, *gen, "Hi", "--max-new-tokens", str(10**12)),
            ["--max-new-tokens"],
        ),
        "more new tokens than the context": (
            adapter(lambda d: None, *gen, "Hi", "--max-new-tokens", "100000"),
            ["exceed this model's context of 512 tokens"],
        ),
        "empty prompt": (adapter(lambda d: None, *gen, "  "), ["the prompt is empty"]),
        # adapters that do not fit their base
        "wrong tensor shape": (
            adapter(lambda d: rewrite_weights(d, shapes), *gen, "Hi"),
            ["'good' does not fit base model", "q_proj.lora_A: [4, 32] in the adapter, [4, 64] for this base"],
        ),
        "rank in the weights differs from the config": (
            adapter(lambda d: rewrite_weights(d, rank), *gen, "Hi"),
            ["adapter_config.json says r=4, the weights have rank 2"],
        ),
        "no tensor names a module of the base": (
            adapter(lambda d: rewrite_weights(d, other_model), *gen, "Hi"),
            ["'good' does not belong to base model", "it was made for another model"],
        ),
        "adapter_config.json of wrong types": (
            adapter(lambda d: edit_json(d / "adapters" / "good" / "adapter_config.json", r="four"), *gen, "Hi"),
            ["adapter_config.json: r has the wrong type"],
        ),
        "lorakit.json of wrong types": (
            adapter(lambda d: edit_json(d / "adapters" / "good" / "lorakit.json", metrics=[1, 2]), *gen, "Hi"),
            ["adapter 'good'", "lorakit.json is unreadable: metrics"],
        ),
        "truncated weights in generate": (adapter(truncate, *gen, "Hi"), ["'good'", "is damaged"]),
        "truncated weights in merge": (
            adapter(truncate, "merge", "good", "--out", "merged", "--store", "adapters"),
            ["'good'", "is damaged"],
        ),
        "truncated weights in export": (
            adapter(truncate, "export", "good", "--format", "gguf", "--out", "good.gguf", "--store", "adapters"),
            ["'good'", "is damaged"],
        ),
        "import of an adapter made for another model": (incoming, ["'foreign' does not belong to base model"]),
        # a checkpoint whose RNG state is a pickle that would run a command
        "poisoned rng_state.pth": (resume_poisoned, ["rng_state.pth cannot be read as a checkpoint file"]),
    }


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"  # a run's lock file is lorakit's: each run writes its holder in it
    }


@pytest.fixture(scope="module")
def outcomes(made, tiny_llama, tmp_path_factory):
    table = cases(tiny_llama)
    prepared = {}
    for name, (setup, needles) in table.items():
        d = tmp_path_factory.mktemp("case")
        shutil.copytree(made / "adapters", d / "adapters")
        if "rng_state" in name:
            shutil.copytree(made / "run", d, dirs_exist_ok=True)
        args = setup(d)
        prepared[name] = (d, args, needles, snapshot(d))
    with pytest.MonkeyPatch.context() as mp, ThreadPoolExecutor(max_workers=2) as pool:
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("COLUMNS", "200")
        runs = {name: pool.submit(run_cli, *args, cwd=d) for name, (d, args, _, _) in prepared.items()}
        return {name: (prepared[name], runs[name].result()) for name in prepared}


@pytest.mark.parametrize("name", list(cases(Path("model"))))
def test_hostile_input_is_a_message_and_loses_nothing(outcomes, name):
    (d, args, needles, before), res = outcomes[name]
    output = res.stdout + res.stderr
    assert "Traceback" not in output, output
    assert res.returncode == 2, f"lorakit {' '.join(args)} -> {res.returncode}\n{output}"
    squashed = "".join(output.split())
    for needle in needles:
        assert "".join(needle.split()) in squashed, f"{needle!r} not in:\n{output}"
    after = snapshot(d)
    assert {k: after.get(k) for k in before} == before, "a file that existed before was changed or removed"
    new = [k for k in after if k not in before and not any(part.startswith(".") for part in Path(k).parts)]
    assert new == [], f"left behind: {new}"
    assert not (d / "code-ran").exists()


def test_adapters_list_shows_the_rest_when_one_is_malformed(made, tmp_path):
    shutil.copytree(made / "adapters", tmp_path / "adapters")
    shutil.copytree(tmp_path / "adapters" / "good", tmp_path / "adapters" / "broken")
    edit_json(tmp_path / "adapters" / "broken" / "adapter_config.json", r="four", target_modules=7)
    edit_json(tmp_path / "adapters" / "broken" / "lorakit.json", recipe=["not", "an", "object"])
    res = run_cli("adapters", "list", "--json", "--store", "adapters", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert set(rows) == {"good", "broken"}
    assert rows["good"]["problem"] is None and rows["broken"]["problem"]
