"""lorakit.json is typed and versioned: files written before the version existed still load and read
right; a newer format or a malformed file is refused by name, and never hides the other adapters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import CHATML, ROOT, run_cli
from lorakit.deploy.merge import base_section, describe_route
from lorakit.deploy.verify import verification_samples
from lorakit.errors import LorakitError
from lorakit.models.reference import resolve
from lorakit.models.tokenizer import load_tokenizer
from lorakit.recipe import BaseModelSection
from lorakit.store.adapters import list_adapters, load_meta, rename_adapter
from lorakit.store.card import model_card
from lorakit.store.loader import load, recorded_base
from lorakit.store.metadata import FORMAT_VERSION, AdapterMeta
from lorakit.use.generate import _style, generate

FORMAT_0 = ROOT / "tests" / "fixtures" / "adapter-format-0"
OLD_BASE = "/tmp/lorakit-format-0/tiny-llama"  # where the format-0 adapters were trained
TARGETS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture
def old_store(tmp_path) -> Path:
    """The adapters written by lorakit 0.1.0, as a store (imported and combined get tides' weights file)."""
    store = tmp_path / "adapters"
    for name in ("tides", "imported", "combined"):
        shutil.copytree(FORMAT_0 / name, store / name)
        if not (store / name / "adapter_model.safetensors").exists():
            shutil.copy(FORMAT_0 / "tides" / "adapter_model.safetensors", store / name)
    return store


def edit_meta(path: Path, **changes) -> None:
    meta = json.loads((path / "lorakit.json").read_text())
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = meta
        for p in parents:
            node = node[p]
        node[key] = value
    (path / "lorakit.json").write_text(json.dumps(meta, indent=2))


# --- format 0: what 0.1.0 wrote ---------------------------------------------------------------


def test_a_trained_format_0_adapter_reads_every_field(old_store):
    meta = load_meta(old_store, "tides")
    assert meta.format_version == FORMAT_VERSION and meta.name == "tides" and meta.method == "LoRA"
    assert not meta.imported and meta.combined is None
    assert isinstance(meta.recipe.base_model, BaseModelSection)
    assert meta.recipe.base_model.name == OLD_BASE and meta.recipe.base_model.quantization == "none"
    assert meta.recipe.lora.r == 4 and meta.recipe.lora.dropout == 0.05 and not meta.recipe.lora.use_dora
    assert meta.recipe.data["block_size"] == 64 and meta.recipe.model_extra["train"]["max_steps"] == 6
    assert meta.base_model.reference == OLD_BASE and meta.base_model.architecture == "LlamaForCausalLM"
    assert meta.base_model.fingerprint.startswith("sha256:b59e86b1")
    assert meta.tokenizer.chat_template == CHATML and meta.tokenizer.prompt_style == "raw"
    assert meta.tokenizer.eos_token == "<|im_end|>"
    assert meta.target_modules == TARGETS and meta.lora_alpha == 8 and meta.trainable_params == 8192
    assert meta.data.sources[0].share == 1.0 and meta.data.sources[0].format == "text"
    assert meta.data.train_tokens == 10889 and meta.data.content_hash.startswith("sha256:eb7f994a")
    assert meta.plan.device == "cpu" and meta.plan.precision == "fp32" and meta.plan.packing is True
    assert meta.plan.learning_rate is None and meta.learning_rate_text() == "0.005"  # the recipe's, as written then
    assert meta.metrics.steps == 6 and meta.metrics.eval_loss_after == pytest.approx(6.215047359466553)
    assert meta.seed == 42 and meta.recipe_hash.startswith("sha256:19b84155")
    assert meta.versions.lorakit == "0.1.0" and meta.versions.peft == "0.21.2"


def test_what_generate_and_merge_take_from_a_format_0_adapter(old_store, tiny_llama):
    meta = load_meta(old_store, "tides")
    assert recorded_base(["tides"], {"tides": meta}, None).name == OLD_BASE
    section = base_section(meta, old_store / "tides", "bfloat16", None)
    assert section.name == OLD_BASE and section.dtype == "bfloat16" and section.quantization == "none"
    assert describe_route(meta, "float32") == "merged into a float32 copy of the base"
    # Its recorded data is where it was made: the samples come from there, or from the built-in text.
    _, where = verification_samples(meta, load_tokenizer(resolve(str(tiny_llama))))
    assert "tides.txt" in where or "built-in text" in where
    assert "| rank / alpha | 4 / 8 |" in model_card("tides", meta)


def test_a_format_0_adapter_generates_as_plain_peft_loads_it(old_store, tiny_llama):
    loaded = load(old_store, "tides", base=str(tiny_llama))
    assert loaded.meta.name == "tides" and loaded.tokenizer.chat_template == CHATML
    assert _style(loaded, "tides", None) == "raw"
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(old_store / "tides"))
    ids = torch.randint(3, 500, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, plain.eval()(input_ids=ids).logits)
    text = generate(loaded, "The tide", max_new_tokens=4, temperature=0)
    assert isinstance(text, str) and text


def test_an_imported_format_0_adapter(old_store):
    meta = load_meta(old_store, "imported")
    assert meta.imported and meta.imported_from == "/tmp/lorakit-format-0/foreign" and meta.method == "LoRA"
    assert meta.recipe.base_model.name == OLD_BASE and meta.recipe.lora.r == 4 and meta.lora_alpha == 8
    assert meta.base_model.fingerprint is None and meta.target_modules == TARGETS
    assert meta.recipe.data is None and meta.data.sources == [] and meta.metrics.steps is None


def test_a_combined_format_0_adapter(old_store):
    meta = load_meta(old_store, "combined")
    assert meta.method == "LoRA (linear of 2)" and meta.combined.method == "linear"
    assert meta.combined.weights == {"tides": 0.5, "logs": 0.5} and meta.combined.density is None
    assert meta.combined.sources["tides"].recipe_hash == load_meta(old_store, "tides").recipe_hash
    assert meta.combined.sources["logs"].target_modules == TARGETS
    assert meta.recipe.base_model.name == OLD_BASE and meta.recipe.lora.r == 4 and meta.lora_alpha == 4
    assert meta.tokenizer.chat_template == CHATML and meta.metrics.eval_loss_after is None


def test_list_of_a_format_0_store(old_store):
    rows = {r["name"]: r for r in list_adapters(old_store)}
    assert [rows[n]["method"] for n in ("combined", "imported", "tides")] == ["LoRA (linear of 2)", "LoRA", "LoRA"]
    assert rows["imported"]["imported"] and not rows["tides"]["imported"]
    assert rows["tides"]["r"] == 4 and rows["tides"]["base_model"] == OLD_BASE
    assert rows["tides"]["eval_loss"] == pytest.approx(6.215047359466553)
    assert all(r["problem"] is None for r in rows.values())


def test_rewriting_a_format_0_file_keeps_everything(old_store):
    """Rename rewrites lorakit.json: in the current format, nothing recorded lost (unknown keys included)."""
    edit_meta(old_store / "tides", recorded_by_a_later_tool="kept", metrics__extra_metric=0.5)
    before = load_meta(old_store, "tides")
    rename_adapter(old_store, "tides", "tides2")
    written = json.loads((old_store / "tides2" / "lorakit.json").read_text())
    assert written["format_version"] == FORMAT_VERSION and written["recorded_by_a_later_tool"] == "kept"
    after = load_meta(old_store, "tides2")
    assert after.metrics.model_extra == {"extra_metric": 0.5}
    assert after.model_dump(exclude={"name"}) == before.model_dump(exclude={"name"})


# --- what cannot be read ----------------------------------------------------------------------


def test_a_newer_format_is_refused_by_name(old_store):
    edit_meta(old_store / "tides", format_version=FORMAT_VERSION + 1)
    with pytest.raises(LorakitError) as info:
        load_meta(old_store, "tides")
    assert str(info.value) == (
        f"adapter 'tides' was written by a newer lorakit (format {FORMAT_VERSION + 1}; "
        f"this one reads {FORMAT_VERSION}): upgrade lorakit"
    )


WRONG = {
    "steps-text": ({"metrics__steps": "many"}, "metrics.steps: Input should be a valid integer"),
    "version-text": ({"format_version": "2"}, "format_version: Input should be a valid integer"),
    "targets-number": ({"target_modules": 3}, "target_modules: Input should be a valid list"),
    "base-quantization": ({"recipe__base_model__quantization": "2bit"}, "recipe.base_model.quantization: "),
    "no-name": ({"name": None}, "name: Input should be a valid string"),
}


@pytest.mark.parametrize("changes,field", WRONG.values(), ids=WRONG.keys())
def test_a_wrong_type_names_the_adapter_and_the_field(old_store, changes, field):
    edit_meta(old_store / "tides", **changes)
    with pytest.raises(LorakitError) as info:
        load_meta(old_store, "tides")
    message = str(info.value)
    assert message.startswith("adapter 'tides': ") and "lorakit.json is unreadable: " + field in message


def test_a_meta_built_in_code_is_the_current_format():
    assert AdapterMeta(name="x").format_version == FORMAT_VERSION == 1


def test_consistency_with_adapter_config_is_still_checked(old_store):
    edit_meta(old_store / "tides", recipe__lora__r=8)
    with pytest.raises(LorakitError, match="adapter_config.json has r=4 but lorakit.json recorded r=8"):
        load_meta(old_store, "tides")


# --- the CLI: one bad adapter never breaks the listing ----------------------------------------


@pytest.fixture
def mixed_store(old_store) -> Path:
    """The format-0 store plus three adapters whose lorakit.json this lorakit cannot use."""
    for name in ("wrong-type", "newer", "truncated"):
        shutil.copytree(old_store / "tides", old_store / name)
    edit_meta(old_store / "wrong-type", metrics__steps="many")
    edit_meta(old_store / "newer", format_version=FORMAT_VERSION + 1)
    (old_store / "truncated" / "lorakit.json").write_text('{"name": "truncated", "recipe": {')
    return old_store


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_cli_list_shows_unreadable_adapters_among_the_others(mixed_store, monkeypatch):
    before = snapshot(mixed_store)
    res = run_cli("adapters", "list", "--json", cwd=mixed_store.parent)
    assert res.returncode == 0, res.stderr
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert set(rows) == {"combined", "imported", "tides", "wrong-type", "newer", "truncated"}
    assert rows["tides"]["method"] == "LoRA" and rows["tides"]["problem"] is None
    assert rows["newer"]["method"] == f"unreadable: written by a newer lorakit (format {FORMAT_VERSION + 1})"
    assert rows["wrong-type"]["method"].startswith("unreadable: metrics.steps: Input should be a valid integer")
    assert rows["truncated"]["problem"].startswith("Expecting")
    for bad in ("wrong-type", "newer", "truncated"):  # what adapter_config.json says is still shown
        assert rows[bad]["r"] == 4 and rows[bad]["base_model"] == OLD_BASE and rows[bad]["size"] > 0
        assert not rows[bad]["imported"]
    monkeypatch.setenv("COLUMNS", "250")
    res = run_cli("adapters", "list", cwd=mixed_store.parent)
    assert res.returncode == 0, res.stderr
    lines = {line.split("│")[1].strip(): line for line in res.stdout.splitlines() if line.count("│") > 2}
    assert "unreadable: written by a newer lorakit" in lines["newer"] and "unreadable:" in lines["truncated"]
    assert "LoRA (linear of 2)" in lines["combined"] and "6.2150" in lines["tides"]
    assert "Traceback" not in res.stderr and snapshot(mixed_store) == before


@pytest.mark.parametrize(
    "name,message",
    [
        ("newer", f"adapter 'newer' was written by a newer lorakit (format {FORMAT_VERSION + 1}"),
        ("wrong-type", "adapter 'wrong-type': "),
        ("truncated", "adapter 'truncated': "),
    ],
)
def test_cli_show_of_an_unreadable_adapter(mixed_store, name, message):
    before = snapshot(mixed_store)
    res = run_cli("adapters", "show", name, cwd=mixed_store.parent)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    text = " ".join(res.stderr.split())
    assert message in text and ("metrics.steps" in text) == (name == "wrong-type")
    assert snapshot(mixed_store) == before
