"""An adapter as a LoRA GGUF file, the form llama.cpp applies at run time (`llama-cli -m BASE.gguf --lora FILE`).

Written with the `gguf` package as llama.cpp's `convert_lora_to_gguf.py` writes it: `general.type` "adapter",
`adapter.type` "lora", `adapter.lora.alpha`, and for every adapted weight `<gguf name>.lora_a` (r x in) and
`.lora_b` (out x r), the rows of Q and K in llama.cpp's rotary order. llama.cpp scales each pair by alpha / r, with r
the pair's own rank, so anything else peft scales by (rsLoRA's alpha / sqrt(r), a per-module alpha) is folded into
lora_b. The file is read back before it is kept, and every B x A in it must equal the adapter's own update."""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.deploy.gguf import BLOCK_TENSORS, check_supported, permute
from lorakit.errors import LorakitError
from lorakit.fs import remove_leftovers, with_umask

QTYPES = ("f32", "f16")
# Largest |B x A in the file - the adapter's update| allowed, relative to the update's largest entry. f32 is exact
# up to the order of summation; f16 rounds A and B to 11 significant bits each.
TOLERANCE = {"f32": 1e-5, "f16": 5e-3}
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(\.default)?\.weight$")
_LAYER = re.compile(r"^model\.layers\.(?P<i>\d+)\.(?P<sub>.+)$")


@dataclass
class LoraGGUFReport:
    out: Path
    qtype: str
    pairs: int  # adapted weights written (each a lora_a and a lora_b tensor)
    alpha: float
    size: int = 0
    folded: list[str] = field(default_factory=list)  # modules whose scale is folded into lora_b, and why
    max_relative_diff: float = float("nan")  # read back: the largest |B x A - update| / largest |update|

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "out": str(self.out)}


def gguf_name(module: str, tied: bool) -> str:
    """The GGUF tensor a peft module path (as in the adapter's keys, without base_model.model.) adapts."""
    if module == "lm_head":
        if tied:
            raise LorakitError(
                "the adapter trains lm_head, which this model ties to its token embeddings; llama.cpp has no "
                "separate output weight to apply it to. Export a merged model with --format gguf instead."
            )
        return "output.weight"
    m = _LAYER.match(module)
    name = BLOCK_TENSORS.get(f"{m['sub']}.weight") if m else None
    if name is None:
        raise LorakitError(
            f"the adapter adapts {module!r}, which llama.cpp's LoRA loader cannot apply (it applies LoRA to the "
            "attention and MLP projections and the output head). Export a merged model with --format gguf instead."
        )
    return f"blk.{m['i']}.{name}"


def check_config(cfg: dict[str, Any]) -> None:
    """Refuse what llama.cpp's LoRA loader cannot reproduce, with the way out."""
    merged = "Export a merged model with --format gguf instead."
    if cfg.get("peft_type", "LORA") != "LORA":
        raise LorakitError(f"a LoRA GGUF holds LoRA adapters; this one is {cfg.get('peft_type')}. {merged}")
    if cfg.get("use_dora"):
        raise LorakitError(f"llama.cpp does not apply DoRA adapters (use_dora). {merged}")
    if cfg.get("modules_to_save"):
        raise LorakitError(
            f"the adapter also trains whole modules ({', '.join(cfg['modules_to_save'])}); a LoRA GGUF holds only "
            f"low-rank pairs. {merged}"
        )
    if cfg.get("lora_bias") or cfg.get("bias", "none") != "none":
        raise LorakitError(f"the adapter trains biases, which a LoRA GGUF cannot hold. {merged}")


def scales(cfg: dict[str, Any], ranks: dict[str, int]) -> dict[str, float]:
    """peft's scale of each module's B x A: alpha / r, or alpha / sqrt(r) with rsLoRA; a per-module alpha where
    `alpha_pattern` names the module (its keys are module-name suffixes or regular expressions, as peft reads them)."""
    pattern = cfg.get("alpha_pattern") or {}
    out = {}
    for module, r in ranks.items():
        alpha = float(cfg.get("lora_alpha", 8))
        for key, value in pattern.items():
            if re.match(rf"(.*\.)?({key})$", module):
                alpha = float(value)
                break
        out[module] = alpha / (r**0.5 if cfg.get("use_rslora") else r)
    return out


def lora_pairs(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The adapter's config and its (A, B) pairs as float32 arrays, by peft module path."""
    from safetensors.numpy import load_file

    try:
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
        state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    except (OSError, ValueError) as e:
        raise LorakitError(f"could not read the adapter in {adapter_dir}: {e}") from None
    check_config(cfg)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state.items():
        m = _KEY.match(key)
        if m is None and key.endswith(".base_layer.weight"):
            continue  # a copy of a base weight peft keeps beside some adapted layers (a tied head): not the adapter's
        if m is None:
            if "lora_embedding" in key:
                raise LorakitError(
                    "the adapter adapts the token embeddings; lorakit writes LoRA GGUF files for the attention and "
                    "MLP projections. Export a merged model with --format gguf instead."
                )
            raise LorakitError(f"unexpected tensor {key!r} in the adapter: not a lora_A or lora_B weight")
        pairs.setdefault(m["module"], {})[m["ab"]] = value.astype(np.float32)
    incomplete = [k for k, v in pairs.items() if len(v) != 2]
    if incomplete or not pairs:
        raise LorakitError(f"the adapter's weights are incomplete (no A/B pair for {', '.join(incomplete) or 'any'})")
    return cfg, {k: (v["A"], v["B"]) for k, v in sorted(pairs.items())}


def tensors(config, cfg: dict[str, Any], pairs: dict[str, tuple[np.ndarray, np.ndarray]]):
    """(GGUF name, lora_a, lora_b) for every pair, the scale folded into lora_b where llama.cpp's alpha / r is not
    peft's, Q and K rows permuted; the alpha to record; the folded modules."""
    alpha = float(cfg.get("lora_alpha", 8))
    scale = scales(cfg, {m: a.shape[0] for m, (a, _) in pairs.items()})
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out, folded = [], []
    for module, (a, b) in pairs.items():
        name = gguf_name(module, tied)
        factor = scale[module] / (alpha / a.shape[0])
        if abs(factor - 1) > 1e-7:
            b = b * np.float32(factor)
            folded.append(f"{module} (scale {scale[module]:.4g})")
        if name.endswith("attn_q.weight"):
            b = permute(b, config.num_attention_heads, config.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            b = permute(b, config.num_attention_heads, config.num_key_value_heads)
        out.append((name, a, b))
    return out, alpha, folded


def write(path: Path, items, alpha: float, qtype: str, name: str) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    dtype = np.float32 if qtype == "f32" else np.float16
    for tname, a, b in items:
        w.add_tensor(f"{tname}.lora_a", a.astype(dtype))
        w.add_tensor(f"{tname}.lora_b", b.astype(dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_back(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The file's metadata and tensors, through the gguf package's reader."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    # numpy shapes: the reader gives ggml's (fastest first) order
    arrays = {t.name: np.asarray(t.data, dtype=np.float32).reshape(tuple(reversed(t.shape))) for t in reader.tensors}
    return fields, arrays


def check(path: Path, items, alpha: float) -> float:
    """Read the file back and compare each pair's alpha / r x B x A with the update it must apply."""
    fields, arrays = read_back(path)
    if fields.get("general.type") != "adapter" or fields.get("adapter.type") != "lora":
        raise LorakitError(f"{path.name}: read back without the adapter type llama.cpp looks for")
    if abs(float(fields["adapter.lora.alpha"]) - alpha) > 1e-6 * max(alpha, 1):
        raise LorakitError(f"{path.name}: alpha read back as {fields['adapter.lora.alpha']}, written {alpha}")
    worst = 0.0
    for tname, a, b in items:
        ga, gb = arrays[f"{tname}.lora_a"], arrays[f"{tname}.lora_b"]
        if ga.shape != a.shape or gb.shape != b.shape:
            raise LorakitError(
                f"{path.name}: {tname} read back as {ga.shape} / {gb.shape}, written {a.shape} / {b.shape}"
            )
        want = (alpha / a.shape[0]) * (b.astype(np.float64) @ a.astype(np.float64))
        got = (alpha / ga.shape[0]) * (gb.astype(np.float64) @ ga.astype(np.float64))
        worst = max(worst, float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12)))
    return worst


def export_lora_gguf(
    adapter_dir: Path,
    base_config,
    out_file: Path,
    qtype: str = "f32",
    overwrite: bool = False,
    name: str = "",
    say=print,
) -> LoraGGUFReport:
    """Write the adapter in `adapter_dir` (for a base with transformers config `base_config`) as a LoRA GGUF."""
    if qtype not in QTYPES:
        raise LorakitError(f"--quant for a LoRA GGUF must be one of {', '.join(QTYPES)}, got {qtype!r}")
    out_file = Path(out_file).expanduser().resolve()
    if out_file.is_dir():
        raise LorakitError(f"--out {out_file} is a folder; name the .gguf file to write")
    if out_file.exists() and not overwrite:
        raise LorakitError(f"--out {out_file} exists; use --overwrite to replace it")
    check_supported(base_config)
    cfg, pairs = lora_pairs(Path(adapter_dir))
    items, alpha, folded = tensors(base_config, cfg, pairs)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out_file)
    tmp = out_file.parent / f".tmp-{out_file.name}-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp, items, alpha, qtype, name or Path(adapter_dir).name)
        report = LoraGGUFReport(out_file, qtype, len(items), alpha, tmp.stat().st_size, folded)
        report.max_relative_diff = check(tmp, items, alpha)
        say(
            f"read back: every B x A within {report.max_relative_diff:.1e} of the adapter's update "
            f"(tolerance {TOLERANCE[qtype]:g} for {qtype})"
        )
        if not report.max_relative_diff <= TOLERANCE[qtype]:
            raise LorakitError(
                f"the LoRA GGUF's updates differ from the adapter's by {report.max_relative_diff:.2e} > "
                f"{TOLERANCE[qtype]:g}; nothing written"
            )
        if folded:
            say(f"scale folded into lora_b (llama.cpp scales by alpha / r): {', '.join(folded)}")
        with_umask(tmp)
        os.replace(tmp, out_file)
    except OSError as e:
        raise LorakitError(f"could not write {out_file}: {e.strerror or e}; nothing written") from None
    finally:
        tmp.unlink(missing_ok=True)
    return report
