"""An adapter as a LoRA GGUF (llama.cpp's --lora): applied the way llama.cpp applies it (each weight plus
alpha / r x lora_b x lora_a) to the base model's GGUF, it gives the GGUF of the model peft merges."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import run_cli
from lorakit.deploy.gguf import export_gguf
from lorakit.deploy.lora_gguf import export_lora_gguf
from lorakit.errors import LorakitError


def quiet(*_):
    pass


def tensors(path: Path) -> tuple[gguf.GGUFReader, dict[str, np.ndarray]]:
    reader = gguf.GGUFReader(str(path))
    return reader, {
        t.name: np.asarray(t.data, dtype=np.float64).reshape(tuple(reversed(t.shape))) for t in reader.tensors
    }


def peft_adapter(base: Path, out: Path, **lora) -> Path:
    """A peft adapter with random (non-zero) A and B, saved as peft saves it."""
    torch.manual_seed(1)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **lora)
    )
    model.save_pretrained(out)
    merged = model.merge_and_unload()
    merged.save_pretrained(out.parent / f"{out.name}-merged")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(base).save_pretrained(out.parent / f"{out.name}-merged")
    return out


def applied_like_llama_cpp(base_gguf: Path, lora_gguf: Path) -> dict[str, np.ndarray]:
    """llama.cpp's LoRA: every adapted weight W becomes W + alpha / r x lora_b @ lora_a (r from lora_a's rows)."""
    _, weights = tensors(base_gguf)
    reader, lora = tensors(lora_gguf)
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    for name in [n.removesuffix(".lora_a") for n in lora if n.endswith(".lora_a")]:
        a, b = lora[f"{name}.lora_a"], lora[f"{name}.lora_b"]
        weights[name] = weights[name] + alpha / a.shape[0] * (b @ a)
    return weights


@pytest.mark.parametrize(
    "lora",
    [
        {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
        # rsLoRA scales by alpha / sqrt(r), and a per-module alpha and rank: all folded into lora_b
        {
            "r": 4,
            "lora_alpha": 16,
            "use_rslora": True,
            "target_modules": ["q_proj", "k_proj", "v_proj", "down_proj"],
            "rank_pattern": {"k_proj": 2},
            "alpha_pattern": {"down_proj": 4},
        },
    ],
    ids=["plain", "rslora-patterns"],
)
def test_lora_gguf_on_the_base_gguf_is_the_merged_gguf(tiny_llama, tmp_path, lora):
    adapter = peft_adapter(tiny_llama, tmp_path / "ad", **lora)
    report = export_lora_gguf(adapter, AutoConfig.from_pretrained(tiny_llama), tmp_path / "ad.gguf", "f32", say=quiet)
    assert report.max_relative_diff < 1e-6
    export_gguf(tiny_llama, tmp_path / "base.gguf", "f32", say=quiet)
    export_gguf(tmp_path / "ad-merged", tmp_path / "merged.gguf", "f32", say=quiet)
    reader, lora_tensors = tensors(tmp_path / "ad.gguf")
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["general.architecture"].contents() == "llama"
    assert report.pairs == len(lora_tensors) // 2 == (14 if lora["target_modules"] == "all-linear" else 8)
    applied = applied_like_llama_cpp(tmp_path / "base.gguf", tmp_path / "ad.gguf")
    _, merged = tensors(tmp_path / "merged.gguf")
    assert applied.keys() == merged.keys()
    for name, w in merged.items():
        np.testing.assert_allclose(applied[name], w, atol=2e-6, rtol=0, err_msg=name)
    base = tensors(tmp_path / "base.gguf")[1]
    moved = [n for n in merged if np.abs(merged[n] - base[n]).max() > 1e-4]
    assert len(moved) == report.pairs  # exactly the adapted weights moved, and the adapter moved them
    assert bool(report.folded) == bool(lora.get("use_rslora"))


def test_f16_is_within_its_tolerance_and_refusals(tiny_llama, tmp_path):
    config = AutoConfig.from_pretrained(tiny_llama)
    adapter = peft_adapter(tiny_llama, tmp_path / "ad", r=4, lora_alpha=8, target_modules="all-linear")
    report = export_lora_gguf(adapter, config, tmp_path / "ad16.gguf", "f16", say=quiet)
    assert 0 < report.max_relative_diff < 5e-3
    assert tensors(tmp_path / "ad16.gguf")[0].tensors[0].tensor_type == gguf.GGMLQuantizationType.F16
    with pytest.raises(LorakitError, match="exists; use --overwrite"):
        export_lora_gguf(adapter, config, tmp_path / "ad16.gguf", "f16", say=quiet)
    with pytest.raises(LorakitError, match="must be one of f32, f16"):
        export_lora_gguf(adapter, config, tmp_path / "q.gguf", "q8_0", say=quiet)
    dora = peft_adapter(tiny_llama, tmp_path / "dora", r=4, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(LorakitError, match="does not apply DoRA"):
        export_lora_gguf(dora, config, tmp_path / "d.gguf", say=quiet)
    saved = peft_adapter(tiny_llama, tmp_path / "mts", r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(LorakitError, match="trains whole modules"):
        export_lora_gguf(saved, config, tmp_path / "m.gguf", say=quiet)
    head = peft_adapter(tiny_llama, tmp_path / "head", r=4, target_modules=["lm_head"])
    with pytest.raises(LorakitError, match="ties to its token embeddings"):
        export_lora_gguf(head, config, tmp_path / "h.gguf", say=quiet)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".gguf") == ["ad16.gguf"]


def test_cli_exports_a_trained_adapter(tiny_llama, tiny_gpt2, tmp_path):
    from test_merge import trained

    trained(tiny_llama, tmp_path, "tiny")
    trained(tiny_gpt2, tmp_path, "gpt")
    ok = run_cli("export", "tiny", "--format", "lora-gguf", "--out", "tiny.gguf", "--quant", "f32", cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    said = " ".join(ok.stdout.split())  # as printed, unwrapped
    assert f"llama-cli -m BASE.gguf --lora {tmp_path / 'tiny.gguf'}" in said
    assert f"lorakit export {tiny_llama} --format gguf --quant f32 --out BASE.gguf" in said
    config = json.loads((tmp_path / "adapters" / "tiny" / "adapter_config.json").read_text())
    reader, lora = tensors(tmp_path / "tiny.gguf")
    assert float(reader.fields["adapter.lora.alpha"].contents()) == config["lora_alpha"]
    assert len(lora) == 2 * 14  # all linear layers of 2 blocks
    for args, message in [
        (("export", "gpt", "--format", "lora-gguf", "--out", "g.gguf"), "supports Llama-family models"),
        (("export", str(tiny_llama), "--format", "lora-gguf", "--out", "m.gguf"), "exports an adapter"),
        (("export", "tiny", "--format", "lora-gguf", "--out", "tiny.gguf"), "exists; use --overwrite"),
    ]:
        res = run_cli(*args, cwd=tmp_path)
        assert res.returncode == 2 and message in " ".join(res.stderr.split()), res.stdout + res.stderr
        assert "Traceback" not in res.stderr
