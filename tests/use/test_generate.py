"""Generation with several adapters on one base: each behaves exactly as when loaded alone."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import RECIPES, run_cli, tiny_recipe
from lorakit.errors import LorakitError
from lorakit.recipe import validate_recipe
from lorakit.store.loader import load
from lorakit.training.run import train
from lorakit.use.generate import adapter_names, chat_reply, encode_batch, generate, generate_batch, read_prompts

TIDES = RECIPES / "data" / "tides.txt"


@pytest.fixture(scope="module")
def two_adapters(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    for name, lr, seed in (("first", 2e-2, 1), ("second", 3e-2, 2)):
        body = tiny_recipe(tiny_llama, TIDES, train={"max_steps": 8, "learning_rate": lr, "seed": seed})
        body["output"] = {"name": name, "store": str(root / "adapters"), "runs_dir": str(root / "runs")}
        train(validate_recipe(body, "test"))
    return root


def logits(loaded, name, ids):
    if name:
        loaded.model.set_adapter(name)
    with torch.no_grad():
        if name is None:
            with loaded.model.disable_adapter():
                return loaded.model(input_ids=ids).logits
        return loaded.model(input_ids=ids).logits


def test_each_adapter_matches_loading_it_alone(two_adapters):
    store = two_adapters / "adapters"
    ids = torch.randint(3, 500, (1, 20), generator=torch.Generator().manual_seed(0))
    both = load(store, ["first", "second"])
    assert both.adapters == ["first", "second"]
    got = {n: logits(both, n, ids) for n in ("first", "second", None)}
    for name in ("first", "second"):
        alone = load(store, name)
        torch.testing.assert_close(got[name], logits(alone, name, ids))
    assert (got["first"] - got["second"]).abs().max() > 1e-3  # two different adapters
    assert (got["first"] - got[None]).abs().max() > 1e-3  # and neither is the base


def test_generate_picks_the_named_adapter(two_adapters):
    loaded = load(two_adapters / "adapters", ["first", "second"])
    opts = {"max_new_tokens": 6, "temperature": 0.0}
    outs = {n: generate(loaded, "At Harrow", adapter=n, **opts) for n in ("first", "second")}
    single = load(two_adapters / "adapters", "second")
    assert outs["second"] == generate(single, "At Harrow", **opts)
    base = generate(loaded, "At Harrow", use_adapter=False, **opts)
    assert len({outs["first"], outs["second"], base}) >= 2


def test_adapters_of_different_bases_are_refused(two_adapters, tiny_gpt2):
    store = two_adapters / "adapters"
    body = tiny_recipe(tiny_gpt2, TIDES, train={"max_steps": 1})
    body["output"] = {"name": "gpt", "store": str(store), "runs_dir": str(two_adapters / "runs")}
    train(validate_recipe(body, "test"))
    with pytest.raises(LorakitError, match="different base models"):
        load(store, ["first", "gpt"])


def test_cli_side_by_side(two_adapters):
    res = run_cli(
        "generate", "--adapter", "first", "--adapter", "second", "--compare", "--temperature", "0",
        "--max-new-tokens", "4", "At Harrow", cwd=two_adapters,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    order = [res.stdout.find(h) for h in ("base model", "adapter first", "adapter second")]
    assert -1 not in order and order == sorted(order), res.stdout


def test_prompts_file_runs_one_mixed_batch(two_adapters, tmp_path):
    """Each row of one batch uses its own adapter (peft's adapter_names) and gives what that adapter
    gives alone: greedy, so the texts must be equal."""
    loaded = load(two_adapters / "adapters", ["first", "second"])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "At Harrow the tide\n@second High water at\n\n@base The keeper\n"
        '{"prompt": "Low water", "adapter": "first"}\n{"prompt": "At Harrow the tide", "adapter": "second"}\n'
    )
    items = read_prompts(prompts, "first", loaded.adapters)
    assert [i.adapter for i in items] == ["first", "second", None, "first", "second"]
    calls = []
    real = loaded.model.generate
    loaded.model.generate = lambda **kw: calls.append(kw) or real(**kw)
    opts = {"max_new_tokens": 6, "temperature": 0.0}
    outs = generate_batch(loaded, items, **opts)
    loaded.model.generate = real
    assert len(calls) == 1 and calls[0]["adapter_names"] == ["first", "second", "__base__", "first", "second"]
    for item, out in zip(items, outs, strict=True):
        alone = generate(loaded, item.prompt, adapter=item.adapter, use_adapter=item.adapter is not None, **opts)
        assert out == alone, item
    # the first step's logits of each row equal that prompt alone with its adapter; rows 0 and 4 differ
    ids, mask = encode_batch(loaded, items, None, loaded.tokenizer.pad_token_id)
    with torch.no_grad():
        batch = loaded.model(input_ids=ids, attention_mask=mask, adapter_names=adapter_names(items)).logits
    for row, item in enumerate(items):
        alone_ids = ids[row : row + 1, mask[row].bool()]
        torch.testing.assert_close(batch[row, -1], logits(loaded, item.adapter, alone_ids)[0, -1], rtol=1e-4, atol=1e-5)
    assert (batch[0, -1] - batch[4, -1]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "text,message",
    [
        ("@third hello\n", "adapter 'third' is not loaded"),
        ('{"adapter": "first"}\n', "expected"),
        ("{not json\n", "not valid JSON"),
        ("\n\n", "no prompts"),
        ("@first\n", "empty prompt"),
    ],
)
def test_bad_prompts_files(tmp_path, text, message):
    path = tmp_path / "p.txt"
    path.write_text(text)
    with pytest.raises(LorakitError, match=message):
        read_prompts(path, "first", ["first", "second"])


def test_cli_prompts_json(two_adapters, tmp_path):
    import json

    (tmp_path / "p.txt").write_text("@second At Harrow\n@base At Harrow\n")
    res = run_cli(
        "generate", "--adapter", "first", "--adapter", "second", "--prompts", str(tmp_path / "p.txt"),
        "--temperature", "0", "--max-new-tokens", "4", "--json", cwd=two_adapters,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [(r["prompt"], r["adapter"]) for r in rows] == [("At Harrow", "second"), ("At Harrow", None)]
    res = run_cli("generate", "--adapter", "first", "--prompts", str(tmp_path / "nope.txt"), cwd=two_adapters)
    assert res.returncode == 2 and "cannot read the prompts file" in " ".join(res.stderr.split())


def test_chat_reply_uses_the_template_and_history(two_adapters):
    loaded = load(two_adapters / "adapters", "first")
    messages = [
        {"role": "user", "content": "When is high water?"},
        {"role": "assistant", "content": "At noon."},
        {"role": "user", "content": "And low water?"},
    ]
    reply = chat_reply(loaded, messages, max_new_tokens=6, temperature=0.0)
    text = loaded.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "At noon." in text and text.endswith("<|im_start|>assistant\n")
    ids = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = loaded.model.generate(
            **ids, max_new_tokens=6, do_sample=False, eos_token_id=loaded.tokenizer.eos_token_id
        )
    assert reply == loaded.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_chat_loop_keeps_history_and_resets(two_adapters, monkeypatch):
    from typer.testing import CliRunner

    from lorakit import cli

    seen = []
    real = chat_reply

    def spy(loaded, messages, **kw):
        seen.append([dict(m) for m in messages])
        return real(loaded, messages, **kw)

    monkeypatch.setattr("lorakit.use.generate.chat_reply", spy)
    monkeypatch.chdir(two_adapters)
    res = CliRunner().invoke(
        cli.app,
        ["chat", "--adapter", "first", "--system", "Be brief.", "--temperature", "0", "--max-new-tokens", "3"],
        input="hello\nmore\n/reset\nagain\n",
    )
    assert res.exit_code == 0, res.output
    assert [[m["role"] for m in s] for s in seen] == [
        ["system", "user"],
        ["system", "user", "assistant", "user"],
        ["system", "user"],  # after /reset: the system message only
    ]
    assert seen[1][1]["content"] == "hello" and seen[1][3]["content"] == "more" and seen[2][1]["content"] == "again"


BNB_PROBE = """
import sys
from lorakit.store.loader import load
full = load(sys.argv[1], "first")
print("bnb after full-precision load:", "bitsandbytes" in sys.modules)
quant = load(sys.argv[2], "q")
kinds = {f"{type(m).__module__}.{type(m).__name__}" for m in quant.model.modules()}
print("4-bit LoRA layers after:", "peft.tuners.lora.bnb.Linear4bit" in kinds)
"""


def test_full_precision_generation_skips_bitsandbytes_and_a_later_qlora_load_still_works(
    two_adapters, tiny_llama, tmp_path
):
    """bitsandbytes (and the torch compiler it imports) is hidden while a full-precision base loads;
    peft's cached 'is bitsandbytes there' answers are forgotten after, so 4-bit loads keep working."""
    body = tiny_recipe(tiny_llama, TIDES, base_model={"quantization": "4bit"}, train={"max_steps": 2})
    body["output"] = {"name": "q", "store": str(tmp_path / "adapters"), "runs_dir": str(tmp_path / "runs")}
    train(validate_recipe(body, "q"))
    res = subprocess.run(
        [sys.executable, "-c", BNB_PROBE, str(two_adapters / "adapters"), str(tmp_path / "adapters")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "bnb after full-precision load: False" in res.stdout
    assert "4-bit LoRA layers after: True" in res.stdout
