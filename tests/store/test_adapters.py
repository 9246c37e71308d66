"""The adapter store: safe names, atomic saves, metadata, listing, base-weight checks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from lorakit.errors import LorakitError
from lorakit.models.reference import resolve, weights_fingerprint
from lorakit.store.adapters import adapter_dir, exists, list_adapters, load_meta, save_adapter
from lorakit.store.loader import check_base
from lorakit.store.metadata import AdapterMeta

IDS = torch.randint(3, 500, (1, 12), generator=torch.Generator().manual_seed(0))


def lora_model(base_dir: Path, seed: int):
    """A LoRA model on the tiny llama whose adapter visibly changes the outputs (B is not zero)."""
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def loaded_logits(base_dir: Path, path: Path) -> torch.Tensor:
    return logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(path)).eval())


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def meta_for(base_dir: Path, name: str, **extra) -> AdapterMeta:
    return AdapterMeta.model_validate(
        {
            "name": name,
            "method": "LoRA",
            "base_model": {"reference": str(base_dir), "fingerprint": "sha256:" + "ab" * 32},
            "recipe": {"lora": {"r": 2}},
            "metrics": {"eval_loss_after": 1.25, "steps": 3},
            "target_modules": ["q_proj"],
            **extra,
        }
    )


@pytest.fixture(scope="module")
def model_a(tiny_llama):
    return lora_model(tiny_llama, seed=1)


@pytest.fixture(scope="module")
def model_b(tiny_llama):
    return lora_model(tiny_llama, seed=2)


@pytest.fixture
def store(tmp_path) -> Path:
    return tmp_path / "adapters"


@pytest.fixture
def saved(model_a, store, tiny_llama) -> Path:
    """Adapter 'a' (model_a) in a fresh store."""
    return save_adapter(model_a, store, "a", meta_for(tiny_llama, "a"))


# --- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "..",
        "a/b",
        "/abs",
        ".hidden",
        "",
        "x" * 65,
        "tiny\n",  # a pattern ending in `$` also matches before a final newline
    ],
)
def test_adapter_dir_rejects_unsafe_names(tmp_path, name):
    with pytest.raises(LorakitError, match="invalid adapter name"):
        adapter_dir(tmp_path, name)


def test_adapter_dir_accepts_a_64_char_name_inside_the_store(tmp_path):
    name = "a" * 64
    assert adapter_dir(tmp_path, name) == tmp_path.resolve() / name


def test_symlink_out_of_the_store_is_refused(tmp_path, model_a, tiny_llama):
    store, outside = tmp_path / "store", tmp_path / "outside"
    store.mkdir()
    outside.mkdir()
    (store / "evil").symlink_to(outside, target_is_directory=True)
    with pytest.raises(LorakitError, match="outside the store"):
        adapter_dir(store, "evil")
    with pytest.raises(LorakitError, match="outside the store"):
        save_adapter(model_a, store, "evil", meta_for(tiny_llama, "evil"), overwrite=True)
    assert list(outside.iterdir()) == []  # nothing was written through the link


# --- saving -----------------------------------------------------------------------------------


def test_save_writes_peft_files_meta_and_card(saved, store, tiny_llama, model_a):
    assert saved == store.resolve() / "a"
    assert {p.name for p in saved.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "lorakit.json",
        "README.md",
    }
    written = json.loads((saved / "lorakit.json").read_text())
    assert written == json.loads(meta_for(tiny_llama, "a").to_json()) and written["format_version"] == 1
    card = (saved / "README.md").read_text()
    head, body = card.removeprefix("---\n").split("---\n", 1)
    assert yaml.safe_load(head)["library_name"] == "peft" and "base_model" not in yaml.safe_load(head)
    assert body.lstrip().startswith("# a\n") and f"`{tiny_llama.name}`" in body
    assert str(tiny_llama) not in card and str(tiny_llama.parent) not in card  # no path of this machine
    assert json.loads((saved / "adapter_config.json").read_text())["target_modules"] == ["q_proj"]
    torch.testing.assert_close(loaded_logits(tiny_llama, saved), logits(model_a))


def test_existing_name_is_refused_without_overwrite(saved, store, model_b, tiny_llama):
    before = snapshot(saved)
    with pytest.raises(LorakitError, match="already exists.*--overwrite"):
        save_adapter(model_b, store, "a", meta_for(tiny_llama, "a", seed=2))
    assert snapshot(saved) == before
    assert [p.name for p in store.iterdir()] == ["a"]


def test_overwrite_replaces_the_adapter(saved, store, model_a, model_b, tiny_llama):
    before = snapshot(saved)
    path = save_adapter(model_b, store, "a", meta_for(tiny_llama, "a", seed=2), overwrite=True)
    assert path == saved
    after = snapshot(saved)
    assert after["adapter_model.safetensors"] != before["adapter_model.safetensors"]
    assert json.loads(after["lorakit.json"])["seed"] == 2
    torch.testing.assert_close(loaded_logits(tiny_llama, saved), logits(model_b))
    assert (logits(model_a) - logits(model_b)).abs().max() > 1e-3  # the two adapters really differ
    assert [p.name for p in store.iterdir()] == ["a"]


# --- atomicity --------------------------------------------------------------------------------


def _disk_full_save(path, **kwargs):
    Path(path).mkdir(parents=True, exist_ok=True)
    (Path(path) / "adapter_model.safetensors").write_bytes(b"\x00partial")
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("name", ["a", "fresh"])
def test_failed_save_keeps_the_previous_adapter(saved, store, model_a, model_b, tiny_llama, monkeypatch, name):
    before = snapshot(saved)
    monkeypatch.setattr(model_b, "save_pretrained", _disk_full_save)
    with pytest.raises(LorakitError, match="No space left"):
        save_adapter(model_b, store, name, meta_for(tiny_llama, name), overwrite=True)
    assert snapshot(saved) == before
    torch.testing.assert_close(loaded_logits(tiny_llama, saved), logits(model_a))
    assert [p.name for p in store.iterdir()] == ["a"]  # no .tmp-*/.old-* left, no half-written 'fresh'
    assert [row["name"] for row in list_adapters(store)] == ["a"]


def test_failed_final_rename_restores_the_previous_adapter(saved, store, model_a, model_b, tiny_llama, monkeypatch):
    """The old adapter is moved aside before the new one is moved in; a failure in between undoes it."""
    before = snapshot(saved)
    real_rename = Path.rename

    def rename(self, target):
        if self.name.startswith(".tmp-"):
            raise OSError(28, "No space left on device")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(LorakitError, match="No space left"):
        save_adapter(model_b, store, "a", meta_for(tiny_llama, "a"), overwrite=True)
    monkeypatch.undo()
    assert snapshot(saved) == before
    torch.testing.assert_close(loaded_logits(tiny_llama, saved), logits(model_a))
    assert [p.name for p in store.iterdir()] == ["a"]


def test_list_hides_temporary_and_incomplete_folders(saved, store):
    tmp = store / ".tmp-x"
    tmp.mkdir()
    (tmp / "adapter_config.json").write_text("{}")
    half = store / "half"
    half.mkdir()
    (half / "adapter_model.safetensors").write_bytes(b"x")
    (half / "lorakit.json").write_text("{}")
    (store / "notes.txt").write_text("not an adapter")
    assert [row["name"] for row in list_adapters(store)] == ["a"]


# --- metadata ---------------------------------------------------------------------------------


def test_list_rows(saved, store, tiny_llama):
    (row,) = list_adapters(store)
    size = sum(p.stat().st_size for p in saved.iterdir())
    assert {k: row[k] for k in ("name", "base_model", "method", "r", "size", "eval_loss")} == {
        "name": "a",
        "base_model": str(tiny_llama),
        "method": "LoRA",
        "r": 2,
        "size": size,
        "eval_loss": 1.25,
    }
    assert size > 0


def test_list_of_a_missing_store_is_empty(tmp_path):
    assert list_adapters(tmp_path / "nowhere") == []


def test_load_meta_round_trips(saved, store, tiny_llama):
    assert load_meta(store, "a") == meta_for(tiny_llama, "a")


def test_load_meta_of_a_missing_adapter_names_the_known_ones(saved, store, model_a, tiny_llama):
    save_adapter(model_a, store, "b", meta_for(tiny_llama, "b"))
    with pytest.raises(LorakitError, match=r"no adapter 'nope' .*\(adapters: a, b\)"):
        load_meta(store, "nope")


def test_load_meta_of_an_incomplete_adapter(saved, store):
    (saved / "adapter_model.safetensors").unlink()
    with pytest.raises(LorakitError, match="'a' is incomplete: missing adapter_model.safetensors"):
        load_meta(store, "a")


CORRUPT = {
    "truncated": b'{"name": "a", "recipe": {',
    "not-utf8": b'{"name": "a\xff\xfe"}',
    "not-an-object": b"[1, 2]",
}


@pytest.mark.parametrize("content", CORRUPT.values(), ids=CORRUPT.keys())
def test_load_meta_of_a_corrupt_meta_file_names_it(saved, store, content):
    meta_file = saved / "lorakit.json"
    meta_file.write_bytes(content)
    with pytest.raises(LorakitError, match="unreadable") as info:
        load_meta(store, "a")
    assert str(meta_file.resolve()) in str(info.value)


@pytest.mark.parametrize("content", CORRUPT.values(), ids=CORRUPT.keys())
def test_list_survives_a_corrupt_meta_file(saved, store, content):
    """One damaged adapter must not break listing the store."""
    (saved / "lorakit.json").write_bytes(content)
    (row,) = list_adapters(store)
    assert row["name"] == "a" and row["size"] > 0


def test_adapter_without_meta_counts_as_imported(saved, store):
    (saved / "lorakit.json").unlink()
    meta = load_meta(store, "a")
    assert meta.name == "a" and meta.imported and meta.recipe.base_model is None
    assert exists(store, "a")


# --- base weights -----------------------------------------------------------------------------


def test_check_base_refuses_other_weights(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    ref = resolve(str(tiny_llama))
    have = weights_fingerprint(ref)
    assert have and have.startswith("sha256:")
    check_base(meta_for(tiny_llama, "mine", base_model={"reference": "x", "fingerprint": have}), ref)
    other = meta_for(tiny_llama, "mine")
    assert other.base_model.fingerprint != have
    with pytest.raises(LorakitError, match="adapter 'mine' was trained on base weights sha256:abab"):
        check_base(other, ref)


def test_check_base_after_the_base_changed(tiny_llama, tmp_path, monkeypatch):
    """Same path, new weights: the cached fingerprint must not hide the change."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "base"
    base.mkdir()
    for f in tiny_llama.iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    ref = resolve(str(base))
    meta = AdapterMeta(name="mine", base_model={"reference": str(base), "fingerprint": weights_fingerprint(ref)})
    check_base(meta, ref)
    weights = base / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    stat = weights.stat()
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with pytest.raises(LorakitError, match="adapter 'mine'"):
        check_base(meta, ref)
