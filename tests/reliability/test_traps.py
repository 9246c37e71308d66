"""The known traps of LoRA fine-tuning, each checked on lorakit's real training path.

pad == EOS masking EOS out of the labels, gradient accumulation that is not the larger batch it
stands for, packed documents that attend to each other, tied embeddings that drift apart, runs
that do not reproduce, and a Ctrl-C that loses the work.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import RECIPES, cpu_plan, read_meta, run_cli, tiny_recipe, write_recipe
from lorakit.data.content import content_hash
from lorakit.data.prepare import prepare
from lorakit.models.architecture import choose_targets
from lorakit.models.reference import resolve
from lorakit.models.tokenizer import load_tokenizer
from lorakit.recipe import validate_recipe
from lorakit.training.checkpoints import MARKER, checkpoints
from lorakit.training.run import train
from lorakit.training.trainer import build_lora_config, build_sft_config, sft_trainer_class

TIDES = RECIPES / "data" / "tides.txt"
IGNORE = -100


def recipe_in(model_dir: Path, root: Path, data_path: Path = TIDES, name: str = "tiny", **sections):
    body = tiny_recipe(model_dir, data_path, **sections)
    body["output"] = {"name": name, "store": str(root / "adapters"), "runs_dir": str(root / "runs")}
    return validate_recipe(body, "test")


def quiet(_message: str) -> None:
    pass


def short_lines(tmp_path: Path) -> Path:
    """Sixty one-line documents, much shorter than a block: several per packed row."""
    path = tmp_path / "short.txt"
    path.write_text("\n".join(f"The tide at harbour {i} turns at {i % 12} o'clock." for i in range(60)))
    return path


def lorakit_trainer(model_dir: Path, tmp_path: Path, packing: bool, **sections):
    """The SFTTrainer lorakit trains with (its class, configs, data), on short documents."""
    data = short_lines(tmp_path)
    r = validate_recipe(
        tiny_recipe(model_dir, data, data={"sources": [{"path": str(data), "split": "line"}]}, **sections), "t"
    )
    ref = resolve(str(model_dir))
    tok = load_tokenizer(ref)
    train_ds, _ = prepare(r.data, tok, r.train.seed).datasets()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.config.use_cache = False
    targets, fan = choose_targets(model, r.lora.target_modules)
    args = build_sft_config(r, tmp_path / "out", cpu_plan(r, targets, fan, packing), has_eval=False)
    return sft_trainer_class()(
        model=model,
        args=args,
        train_dataset=train_ds,
        processing_class=tok,
        peft_config=build_lora_config(r, cpu_plan(r, targets, fan)),
    )


def document_spans(batch) -> list[tuple[int, int, int]]:
    """(row, start, end) of every document in a collated batch (padding-free: position_ids reset)."""
    if "position_ids" in batch:
        spans = []
        for row, pos in enumerate(batch["position_ids"]):
            starts = (pos == 0).nonzero().flatten().tolist() + [len(pos)]
            spans += [(row, a, b) for a, b in zip(starts, starts[1:], strict=False)]
        return spans
    return [(row, 0, int(mask.sum())) for row, mask in enumerate(batch["attention_mask"])]


# --- pad == EOS ---------------------------------------------------------------------------------


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_pad_equal_to_eos_still_supervises_eos(tiny_gpt2, tmp_path, packing):
    trainer = lorakit_trainer(tiny_gpt2, tmp_path, packing)
    tok = trainer.processing_class
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos  # the trap is armed: GPT-2 has no other special token
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    spans = document_spans(batch)
    assert len(spans) >= 4
    for row, a, b in spans:
        ids, labels = batch["input_ids"][row, a:b].tolist(), batch["labels"][row, a:b].tolist()
        supervised = [t for t in labels if t != IGNORE]
        assert ids[-1] == eos, "each document ends in EOS"
        assert supervised[-1] == eos, f"EOS masked out of document {ids}"
        assert supervised.count(eos) == 1, "only the document's own EOS is learned, not padding"
        if "attention_mask" in batch:
            assert batch["attention_mask"][row, b - 1] == 1  # the model sees the EOS it must predict
    if not packing:  # padding (with the EOS id) carries no loss
        pad = batch["attention_mask"] == 0
        assert pad.any() and (batch["labels"][pad] == IGNORE).all()


# --- gradient accumulation ----------------------------------------------------------------------


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_gradient_accumulation_equals_the_larger_batch(tiny_llama, tmp_path, packing):
    """8 x 1 and 2 x 4 see the same 8 rows; one plain SGD step (no clipping, no warmup) must agree.

    SGD rather than Adam: Adam's first step is lr * sign(gradient), blind to a loss scaled by the
    number of micro-batches. Padded rows hold different token counts, so a mean of per-micro-batch
    means would also differ from the token mean of the whole batch.
    """
    weights = {}
    for batch, accumulation in ((8, 1), (2, 4)):
        r = recipe_in(
            tiny_llama,
            tmp_path / f"b{batch}",
            lora={"dropout": 0.0},
            data={"eval_split": 0, "packing": packing},
            train={
                "max_steps": 1, "batch_size": batch, "gradient_accumulation": accumulation, "optimizer": "sgd",
                "learning_rate": 0.5, "max_grad_norm": 0, "warmup_ratio": 0, "scheduler": "constant",
            },
        )  # fmt: skip
        result = train(r, say=quiet)
        assert result.metrics["steps"] == 1
        weights[batch] = load_file(result.path / "adapter_model.safetensors")
    big, accumulated = weights[8], weights[2]
    assert big.keys() == accumulated.keys()
    moved = max(big[k].abs().max().item() for k in big if "lora_B" in k)
    assert moved > 1e-3  # the step did something (lora_B starts at zero)
    for k in big:
        torch.testing.assert_close(accumulated[k], big[k], rtol=0, atol=1e-5, msg=k)


# --- packed documents stay apart ----------------------------------------------------------------


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_gpt2"])
def test_packed_documents_do_not_attend_to_each_other(model_fixture, request, tmp_path):
    model_dir = request.getfixturevalue(model_fixture)
    trainer = lorakit_trainer(model_dir, tmp_path, packing=True)
    model = trainer.model.eval()
    with torch.no_grad():  # an adapter that is not the identity, as after some training
        g = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert "position_ids" in batch and "attention_mask" not in batch  # padding-free, as in training
    spans = document_spans(batch)
    assert len(spans) >= 3
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        packed = model(**inputs, use_cache=False).logits
        for row, a, b in spans[1:]:
            alone = model(input_ids=batch["input_ids"][row : row + 1, a:b], use_cache=False).logits
            torch.testing.assert_close(packed[row : row + 1, a:b], alone, rtol=0, atol=1e-5)


# --- trained twice: same result; tied embeddings untouched ----------------------------------------


@pytest.fixture(scope="module")
def twice(tiny_llama, tmp_path_factory):
    """The same recipe (seed 7) trained in two fresh folders, and once with another seed."""
    out = {}
    for key, seed in (("a", 7), ("b", 7), ("other-seed", 8)):
        root = tmp_path_factory.mktemp(f"repro-{key}")
        r = recipe_in(tiny_llama, root, data={"eval_split": 0}, train={"seed": seed, "max_steps": 5})
        out[key] = (root, r, train(r, say=quiet))
    return out


def losses(root: Path, name: str = "tiny") -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (root / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["loss"]) for row in rows if "loss" in row]


def test_same_recipe_same_seed_reproduces_exactly(twice):
    (root_a, _, a), (root_b, _, b) = twice["a"], twice["b"]
    la, lb = losses(root_a), losses(root_b)
    assert [s for s, _ in la] == [1, 2, 3, 4, 5]
    assert la == lb
    ta, tb = load_file(a.path / "adapter_model.safetensors"), load_file(b.path / "adapter_model.safetensors")
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    # The seed is what makes them equal: another seed gives another adapter.
    tc = load_file(twice["other-seed"][2].path / "adapter_model.safetensors")
    assert any(not torch.equal(ta[k], tc[k]) for k in ta)


def test_lorakit_json_records_what_reproduction_needs(twice):
    for key in ("a", "b"):
        root, r, result = twice[key]
        meta = read_meta(root / "adapters", "tiny")
        assert meta["seed"] == 7 == meta["recipe"]["train"]["seed"]
        for pkg in ("torch", "transformers", "peft", "trl"):
            assert meta["versions"][pkg] == md.version(pkg), pkg
        assert meta["data"]["content_hash"] == content_hash(r.data)


def test_tied_embeddings_stay_tied_and_untouched(twice, tiny_llama):
    _, _, result = twice["a"]
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert base.config.tie_word_embeddings
    original = base.get_input_embeddings().weight.detach().clone()
    saved = load_file(result.path / "adapter_model.safetensors")
    assert not [k for k in saved if "embed" in k or "lm_head" in k]  # LoRA saved no embedding weights
    model = PeftModel.from_pretrained(base, str(result.path))
    w_in, w_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert w_in.data_ptr() == w_out.data_ptr()
    torch.testing.assert_close(w_in, original, rtol=0, atol=0)
    # And merged into the base, the tie still holds (the head is the embedding, unchanged).
    merged = model.merge_and_unload()
    assert merged.get_input_embeddings().weight.data_ptr() == merged.get_output_embeddings().weight.data_ptr()
    torch.testing.assert_close(merged.get_output_embeddings().weight, original, rtol=0, atol=0)


# --- a real Ctrl-C through the CLI ----------------------------------------------------------------


def test_ctrl_c_through_the_cli_checkpoints_and_resumes(tiny_llama, tmp_path):
    body = tiny_recipe(
        tiny_llama, TIDES, data={"eval_split": 0}, train={"max_steps": 400, "save_every": 50, "logging_every": 1}
    )
    write_recipe(tmp_path, body)
    metrics = tmp_path / "runs" / "tiny" / "metrics.jsonl"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    with (tmp_path / "out.txt").open("w") as out, (tmp_path / "err.txt").open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lorakit.cli", "train", "recipe.yaml"], cwd=tmp_path, stdout=out, stderr=err, env=env
        )
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                if metrics.exists() and sum('"loss"' in line for line in metrics.read_text().splitlines()) >= 3:
                    break
                time.sleep(0.05)
            assert proc.poll() is None, "training ended before it could be interrupted"
            assert time.monotonic() < deadline, "no 3 logged steps within 60 s"
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = (tmp_path / "err.txt").read_text()
    assert code == 3, stderr
    assert "Traceback" not in stderr
    assert "resume with" in stderr and "--resume" in stderr
    m = re.search(r"interrupted at step (\d+)", stderr)
    assert m, stderr
    step = int(m.group(1))
    assert 3 <= step < 400
    done = checkpoints(tmp_path / "runs" / "tiny")
    assert [p.name for p in done] == [f"checkpoint-{step}"]
    assert (done[0] / MARKER).is_file() and (done[0] / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "adapters" / "tiny").exists()  # no adapter from an interrupted run

    res = run_cli("train", "recipe.yaml", "--resume", "--set", f"train.max_steps={step + 3}", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    meta = read_meta(tmp_path / "adapters", "tiny")
    assert meta["metrics"]["steps"] == step + 3
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"loss"' in line]
    assert logged[-3:] == [step + 1, step + 2, step + 3]
    assert not checkpoints(tmp_path / "runs" / "tiny", complete_only=False)  # cleaned up
