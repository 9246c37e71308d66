"""adapters list (columns, --base filter), cp, rename and import of PEFT adapters made elsewhere."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import RECIPES, run_cli, tiny_recipe
from lorakit.errors import LorakitError
from lorakit.recipe import validate_recipe
from lorakit.store.adapters import copy_adapter, import_adapter, list_adapters, load_meta, rename_adapter
from lorakit.store.loader import load
from lorakit.training.run import train

TIDES = RECIPES / "data" / "tides.txt"


@pytest.fixture(scope="module")
def store(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    body = tiny_recipe(tiny_llama, TIDES, train={"max_steps": 3, "learning_rate": 2e-2})
    body["output"] = {"name": "tides", "store": str(root / "adapters"), "runs_dir": str(root / "runs")}
    train(validate_recipe(body, "test"))
    return root / "adapters"


@pytest.fixture
def foreign(tiny_llama, tmp_path):
    """A LoRA adapter written by plain PEFT, as another tool would."""
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    out = tmp_path / "from-elsewhere"
    model.save_pretrained(out)
    return out


def test_list_rows_describe_each_adapter(store):
    (row,) = [r for r in list_adapters(store) if r["name"] == "tides"]
    assert row["method"] == "LoRA" and row["r"] == 4 and not row["imported"]
    assert row["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert row["trainable_params"] > 0 and row["size"] > 0 and isinstance(row["eval_loss"], float)


def test_copy_and_rename_keep_weights_and_update_the_name(store):
    weights = (store / "tides" / "adapter_model.safetensors").read_bytes()
    copy_adapter(store, "tides", "tides-copy")
    assert (store / "tides-copy" / "adapter_model.safetensors").read_bytes() == weights
    copied = load_meta(store, "tides-copy")
    assert copied.name == "tides-copy" and copied.copied_from == "tides"
    assert copied.metrics == load_meta(store, "tides").metrics
    with pytest.raises(LorakitError, match="already exists"):
        copy_adapter(store, "tides", "tides-copy")
    rename_adapter(store, "tides-copy", "tides-renamed")
    assert not (store / "tides-copy").exists()
    assert load_meta(store, "tides-renamed").name == "tides-renamed"
    with pytest.raises(LorakitError, match="already exists"):
        rename_adapter(store, "tides-renamed", "tides")
    with pytest.raises(LorakitError, match="invalid adapter name"):
        rename_adapter(store, "tides-renamed", "../out")


def test_import_registers_a_peft_adapter_that_then_loads(store, foreign, tiny_llama):
    import_adapter(store, foreign, name="foreign")
    meta = load_meta(store, "foreign")
    assert meta.imported is True and meta.target_modules == ["q_proj", "v_proj"]
    assert meta.imported_from == str(foreign.resolve()) and meta.recipe.base_model.name == str(tiny_llama)
    (row,) = [r for r in list_adapters(store) if r["name"] == "foreign"]
    assert row["imported"] and row["r"] == 2
    loaded = load(store, "foreign", base=str(tiny_llama))
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(foreign)).eval()
    ids = torch.randint(3, 500, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert (
        load_file(store / "foreign" / "adapter_model.safetensors").keys()
        == load_file(foreign / "adapter_model.safetensors").keys()
    )


def test_import_refuses_what_is_not_a_lora_adapter(store, tmp_path, foreign):
    with pytest.raises(LorakitError, match="not a PEFT adapter folder"):
        import_adapter(store, tmp_path / "empty-dir")
    (foreign / "adapter_model.safetensors").rename(foreign / "adapter_model.bin")
    with pytest.raises(LorakitError, match="save again as safetensors"):
        import_adapter(store, foreign, name="binonly")
    assert not (store / "binonly").exists()


def test_cli_list_filter_and_json(store):
    root = store.parent
    res = run_cli("adapters", "list", "--json", "--base", "no-such-base", cwd=root)
    assert res.returncode == 0 and json.loads(res.stdout) == []
    res = run_cli("adapters", "list", "--json", "--base", "tiny-llama", cwd=root)
    assert "tides" in {r["name"] for r in json.loads(res.stdout)}
    res = run_cli("adapters", "rename", "tides", "../x", cwd=root)
    assert res.returncode == 2 and "invalid adapter name" in res.stderr and "Traceback" not in res.stderr
