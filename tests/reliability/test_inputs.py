"""Every input a user can get wrong gives a LorakitError (CLI: exit 2) that names the file, key or
line and says what to do — never a traceback. Also: inputs that are odd but fine (one enormous line)
just work.

CLI subprocesses cost seconds each (torch imports), so only a few cases go through `lorakit train`,
side by side; the rest are checked in-process on the functions the CLI calls.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import RECIPES, load_on_cpu, run_cli, tiny_recipe, write_recipe
from lorakit.data.prepare import prepare
from lorakit.data.sources import read_records
from lorakit.data.tokens import IGNORE
from lorakit.errors import LorakitError
from lorakit.models.architecture import check_quantizable, skeleton
from lorakit.models.reference import resolve
from lorakit.models.tokenizer import load_tokenizer
from lorakit.recipe import BaseModelSection, DataSection, DataSource, RecipeError, validate_recipe
from lorakit.store.adapters import list_adapters
from lorakit.store.loader import load
from lorakit.training.run import train

TIDES = RECIPES / "data" / "tides.txt"
EXIT_INPUT = 2
CPU = torch.device("cpu")


def corrupt_copy(model_dir: Path, dest: Path, how: str) -> Path:
    """A copy of a model folder whose model.safetensors is damaged in one way."""
    shutil.copytree(model_dir, dest)
    weights = dest / "model.safetensors"
    data = weights.read_bytes()
    if how == "truncated":  # a download cut short
        weights.write_bytes(data[: len(data) // 2])
    elif how == "garbage":  # not safetensors at all (an HTML error page, a git-lfs pointer...)
        weights.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 429336\n")
    else:  # the header is damaged
        weights.write_bytes(data[:8] + b"{broken" + data[15:])
    return dest


def madeup_gguf(path: Path) -> Path:
    """A well-formed GGUF file whose architecture no library knows."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "madeup")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- through the CLI: exit 2, a message, no traceback ------------------------------------------


def _out(res) -> str:
    return res.stdout + res.stderr


def _squash(text: str) -> str:
    return "".join(text.split())  # rich wraps long lines (and paths) at the terminal width


@pytest.fixture(scope="module")
def cli_runs(tiny_llama, tmp_path_factory):
    """`lorakit train recipe.yaml` on four bad inputs, two at a time."""
    cases = {}
    d = tmp_path_factory.mktemp("missing-model")
    write_recipe(d, tiny_recipe(d / "no-such-model", TIDES))
    cases["missing-model-dir"] = (d, [str(d / "no-such-model"), "model directory not found"])

    d = tmp_path_factory.mktemp("corrupt-weights")
    broken = corrupt_copy(tiny_llama, d / "model", "truncated")
    write_recipe(d, tiny_recipe(broken, TIDES))
    cases["corrupt-safetensors"] = (d, [str(broken), "model.safetensors"])

    d = tmp_path_factory.mktemp("garbage-gguf")
    (d / "model.gguf").write_bytes(b"<html>404 Not Found</html>\n" * 20)
    write_recipe(d, tiny_recipe(d / "model.gguf", TIDES))
    cases["garbage-gguf"] = (d, [str(d / "model.gguf"), "does not start with the GGUF magic bytes"])

    d = tmp_path_factory.mktemp("bad-jsonl")
    rows = d / "rows.jsonl"
    rows.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three\n{"text": "four"}\n')
    write_recipe(d, tiny_recipe(tiny_llama, rows, data={"sources": [{"path": str(rows), "format": "text"}]}))
    cases["malformed-jsonl"] = (d, [f"{rows}: line 3 is not valid JSON"])

    with pytest.MonkeyPatch.context() as mp, ThreadPoolExecutor(max_workers=2) as pool:
        mp.setenv("OMP_NUM_THREADS", "1")
        futures = {case: pool.submit(run_cli, "train", "recipe.yaml", cwd=d) for case, (d, _) in cases.items()}
        return {case: (cases[case][0], futures[case].result(), cases[case][1]) for case in cases}


@pytest.mark.parametrize(
    "case",
    [
        "missing-model-dir",
        pytest.param(
            "corrupt-safetensors",
        ),
        "garbage-gguf",
        "malformed-jsonl",
    ],
)
def test_cli_bad_input_is_a_message_not_a_traceback(cli_runs, case):
    d, res, needles = cli_runs[case]
    assert "Traceback" not in _out(res), _out(res)
    assert res.returncode == EXIT_INPUT, _out(res)
    assert "error:" in res.stderr
    for needle in needles:
        assert _squash(needle) in _squash(_out(res)), f"{needle!r} not in:\n{_out(res)}"
    assert not (d / "adapters").exists()  # nothing half-written


# --- data ------------------------------------------------------------------------------------------


def test_one_enormous_line_is_chunked_into_blocks(tiny_llama, tmp_path):
    """A 2 MB file without a single newline (minified export, one-line dump) prepares into blocks."""
    words = TIDES.read_text().split()
    text = " ".join(words[i % len(words)] for i in range(400_000))[:2_000_000]
    path = tmp_path / "one-line.txt"
    path.write_text(text)
    assert path.stat().st_size == 2_000_000 and "\n" not in text
    tok = load_tokenizer(resolve(str(tiny_llama)))
    block = 128
    section = DataSection(sources=[DataSource(path=str(path), split="line")], block_size=block, eval_split=0.05)
    prep = prepare(section, tok, seed=0)
    pieces = prep.train + prep.eval
    assert prep.report["sources"][0]["documents"] == 1
    assert len(prep.eval) > 0 and len(prep.train) > 10 * len(prep.eval)
    assert all(len(e.input_ids) == len(e.labels) <= block for e in pieces)
    assert sum(len(e.input_ids) < block for e in pieces) <= 1  # only the tail piece is short
    assert prep.report["train_tokens"] + prep.report["eval_tokens"] > 300_000  # nothing was cut off
    assert sum(e.input_ids[-1] == tok.eos_token_id for e in pieces) == 1  # one document, one EOS
    assert all(label != IGNORE for e in pieces for label in e.labels)  # plain text: all supervised


def test_malformed_jsonl_row_names_file_line_and_column(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "c" "d": 1}\n')
    with pytest.raises(LorakitError) as info:
        read_records(DataSource(path=str(path)))
    message = str(info.value)
    assert str(path) in message and "line 4 is not valid JSON" in message and "column" in message


def test_truncated_last_jsonl_row_names_its_line(tmp_path):
    """A file cut off mid-write: the last row is incomplete."""
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(9)) + '{"text": "row 9')
    with pytest.raises(LorakitError, match=r"line 10 is not valid JSON"):
        read_records(DataSource(path=str(path)))


def test_jsonl_rows_may_contain_unicode_line_separators(tmp_path):
    rows = [{"text": "first"}, {"text": "para one\u2028para two"}, {"text": "next\x85line"}, {"text": "last"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    assert read_records(DataSource(path=str(path))) == rows


# --- model references ------------------------------------------------------------------------------


@pytest.mark.parametrize("ref", ["./no-such-model", "~/no-such-lorakit-model", "models/org/no-such-model"])
def test_missing_local_model_dir(tmp_path, monkeypatch, ref):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LorakitError, match="model directory not found") as info:
        resolve(ref)
    assert ref.lstrip("./~").split("/")[-1] in str(info.value)


@pytest.mark.parametrize(
    "how",
    [
        pytest.param(
            how,
        )
        for how in ("truncated", "garbage", "bad-header")
    ],
)
def test_corrupt_weights_are_a_clear_error(tiny_llama, tmp_path, how):
    broken = corrupt_copy(tiny_llama, tmp_path / "model", how)
    ref = resolve(str(broken))
    skeleton(ref)  # the config is fine: the damage shows only when the weights are read
    try:
        load_on_cpu(broken, BaseModelSection(name=str(broken)))
    except LorakitError as e:
        assert str(broken) in str(e) and "safetensors" in str(e)
    except Exception as e:
        pytest.fail(f"{type(e).__module__}.{type(e).__name__} instead of LorakitError: {e}")
    else:
        pytest.fail("a damaged model.safetensors loaded without complaint")


def test_garbage_gguf_is_a_clear_error(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"\x00" * 64)
    ref = resolve(str(path))
    for step in (skeleton, load_tokenizer):
        with pytest.raises(LorakitError, match="GGUF magic") as info:
            step(ref)
        assert str(path) in str(info.value)


def test_gguf_of_an_unsupported_architecture(tmp_path):
    """A valid GGUF file of an architecture transformers cannot load: refused by train() before anything runs."""
    path = madeup_gguf(tmp_path / "tiny-madeup.gguf")
    body = tiny_recipe(path, TIDES)
    body["output"] = {"name": "x", "store": str(tmp_path / "adapters"), "runs_dir": str(tmp_path / "runs")}
    with pytest.raises(LorakitError, match="architecture madeup is not supported"):
        train(validate_recipe(body, "test"), say=lambda _: None)
    assert not (tmp_path / "adapters").exists() and not (tmp_path / "runs").exists()


def test_unsupported_gguf_message_names_the_file(tmp_path):
    path = madeup_gguf(tmp_path / "tiny-madeup.gguf")
    with pytest.raises(LorakitError) as info:
        skeleton(resolve(str(path)))
    assert str(path) in str(info.value)


# --- adapters --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_store(tiny_llama, tmp_path_factory):
    """A real adapter (r=4, every linear layer) trained for one step."""
    root = tmp_path_factory.mktemp("adapter-store")
    body = tiny_recipe(tiny_llama, TIDES, data={"eval_split": 0}, train={"max_steps": 1})
    body["output"] = {"name": "good", "store": str(root / "adapters"), "runs_dir": str(root / "runs")}
    result = train(validate_recipe(body, "test"), say=lambda _: None)
    return root / "adapters", result


def tampered(store: Path, result, name: str, **config) -> str:
    """A copy of the good adapter whose adapter_config.json was edited (lorakit.json unchanged)."""
    shutil.copytree(result.path, store / name)
    cfg_path = store / name / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **config}))
    return name


def test_good_adapter_loads(adapter_store):
    store, result = adapter_store
    loaded = load(store, "good")
    assert loaded.adapter == "good" and loaded.meta.recipe.lora.r == 4


def test_adapter_rank_differing_from_its_recipe_is_named(adapter_store):
    store, result = adapter_store
    name = tampered(store, result, "rank8", r=8)
    with pytest.raises(LorakitError) as info:
        load(store, name)
    assert "r" in str(info.value) and "8" in str(info.value) and "4" in str(info.value)


def test_adapter_targets_differing_from_its_recipe_are_named(adapter_store):
    store, result = adapter_store
    name = tampered(store, result, "fewer-targets", target_modules=["q_proj", "v_proj"])
    with pytest.raises(LorakitError, match="target_modules"):
        load(store, name)


def test_adapter_without_weights_is_incomplete(adapter_store):
    store, result = adapter_store
    shutil.copytree(result.path, store / "no-weights")
    (store / "no-weights" / "adapter_model.safetensors").unlink()
    with pytest.raises(LorakitError, match=r"adapter 'no-weights' is incomplete: missing adapter_model\.safetensors"):
        load(store, "no-weights")


def test_adapter_without_weights_is_not_listed(adapter_store):
    store, result = adapter_store
    shutil.copytree(result.path, store / "weightless")
    (store / "weightless" / "adapter_model.safetensors").unlink()
    assert "good" in {row["name"] for row in list_adapters(store)}
    assert "weightless" not in {row["name"] for row in list_adapters(store)}


# --- quantization on a machine without bitsandbytes ---------------------------------------------------


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantization_without_bitsandbytes(tiny_llama, monkeypatch, bits):
    meta_model = skeleton(resolve(str(tiny_llama)))
    section = BaseModelSection(name=str(tiny_llama), quantization=bits)
    check_quantizable(meta_model, section)  # fine where bitsandbytes imports
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    with pytest.raises(LorakitError, match=f"quantization {bits} needs bitsandbytes"):
        check_quantizable(meta_model, section)
    check_quantizable(skeleton, BaseModelSection(name=str(tiny_llama)))  # unquantized: no need


# --- numbers a recipe should not accept ---------------------------------------------------------------


# Infinite values here would crash training (epochs, weight) or silently train NaN weights (alpha, decay).
FLOAT_KEYS = [
    "train.epochs", "data.sources.0.weight", "lora.alpha", "train.weight_decay",
    "train.learning_rate", "train.warmup_ratio", "lora.dropout", "data.eval_split",
]  # fmt: skip


def case(key: str, value: float):
    return pytest.param(key, value, id=f"{key}={value}")


@pytest.mark.parametrize(("key", "value"), [case(k, v) for k in FLOAT_KEYS for v in (math.inf, -math.inf, math.nan)])
def test_non_finite_numbers_are_refused(key, value):
    raw: dict = {"data": {"sources": [{"path": "d.txt"}]}}
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    node[leaf] = value
    with pytest.raises(RecipeError) as info:
        validate_recipe(raw, "r.yaml", default_name="r")
    assert key in dict(info.value.problems), info.value.problems


def test_a_long_text_is_tokenized_in_pieces_with_the_ids_of_one_call(tiny_llama, monkeypatch):
    """Texts longer than LONG_TEXT_CHARS go to the tokenizer in pieces cut before whitespace (bounded memory);
    the ids are those of the whole text in one call: special tokens once at the start, one EOS at the end."""
    from lorakit.data import formats

    tok = load_tokenizer(resolve(str(tiny_llama)))
    words = TIDES.read_text().split()
    long_text = " ".join(words[i % len(words)] for i in range(3000))
    texts = ["A short one.", long_text, "Another short one.", long_text[:500]]
    whole_ids, whole_offsets = formats.encode(tok, texts, special=True, eos=tok.eos_token_id)
    monkeypatch.setattr(formats, "LONG_TEXT_CHARS", 1000)
    calls = []
    original = formats._encode

    def counted(tokenizer, batch, *args):
        calls.append(max(map(len, batch), default=0))
        return original(tokenizer, batch, *args)

    monkeypatch.setattr(formats, "_encode", counted)
    ids, offsets = formats.encode(tok, texts, special=True, eos=tok.eos_token_id)
    assert max(calls) <= 1000 < len(long_text)  # no call saw the long text whole
    np.testing.assert_array_equal(offsets, whole_offsets)
    np.testing.assert_array_equal(ids, whole_ids)


def test_text_pieces_cut_before_whitespace_and_lose_nothing():
    from lorakit.data.formats import text_pieces

    text = "word " * 1000 + "x" * 3000  # then no whitespace at all
    pieces = text_pieces(text, size=256)
    assert "".join(pieces) == text
    assert all(len(p) <= 256 for p in pieces)
    assert all(p.startswith(" ") for p in pieces[1:] if not p.startswith("x"))


def test_sharegpt_conversations_and_text_parts_are_read_as_messages(tmp_path):
    path = tmp_path / "chat.jsonl"
    parts = [{"type": "text", "text": "Two "}, {"type": "text", "text": "parts"}]
    rows = [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "Yes."}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = read_records(DataSource(path=str(path), format="chat"))
    assert records[0]["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert records[1]["messages"][0] == {"role": "user", "content": "Two parts"}


def test_tool_calling_turns_keep_their_fields(tmp_path):
    """An assistant turn that calls a tool has no text (content null) and a tool_calls list: accepted, and the
    message's other keys reach the chat template as written."""
    call = [{"type": "function", "function": {"name": "tide", "arguments": "{}"}}]
    row = {"messages": [{"role": "user", "content": "When is high tide?"},
                        {"role": "assistant", "content": None, "tool_calls": call},
                        {"role": "tool", "content": "14:02", "tool_call_id": "1", "name": "tide"},
                        {"role": "assistant", "content": "At 14:02."}]}  # fmt: skip
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps(row) + "\n")
    msgs = read_records(DataSource(path=str(path), format="chat"))[0]["messages"]
    assert msgs[1] == {"role": "assistant", "content": None, "tool_calls": call}
    assert msgs[2]["tool_call_id"] == "1" and msgs[2]["name"] == "tide"
