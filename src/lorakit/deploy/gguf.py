"""Export of a merged model to GGUF (for llama.cpp), checked by reading the file back.

Written with the `gguf` package alone (no llama.cpp build): tensor names, the Q/K row order for
rotary embeddings, metadata and tokenizer as llama.cpp's `convert_hf_to_gguf.py` writes them for a
Llama-family model. The file is checked before it is kept: reloaded with transformers' GGUF loader,
its logits are compared with the source model's on a fixed text."""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorakit.errors import LorakitError
from lorakit.fs import remove_leftovers, with_umask
from lorakit.models.load import load_model
from lorakit.models.reference import ModelRef, resolve
from lorakit.plan import Plan
from lorakit.recipe import BaseModelSection

SUPPORTED = ("llama",)
QTYPES = ("f32", "f16", "q8_0")
# Largest |GGUF - source| logit difference allowed, relative to the largest |logit| (at least 1).
# f32 is exact (measured 0); f16 rounds weights to 11 significant bits (measured 1.1e-3 on
# SmolLM2-135M, 2.5e-4 on the tiny test Llama); q8_0 stores each block of 32 weights as 8-bit
# integers with one f16 scale (measured 4.9e-2 on SmolLM2-135M, whose tied 49k-token embedding is
# the output head too, and 7.7e-3 on the tiny test Llama).
TOLERANCE = {"f32": 1e-4, "f16": 1e-2, "q8_0": 1.5e-1}
CHECK_TEXT = (
    "The keeper climbed the stairs of the lighthouse at dusk, trimmed the wick and wound the clockwork "
    "that turned the lens. Out on the water the tide was turning."
)
# HF Llama parameter suffix (within model.layers.N.) -> GGUF tensor name (within blk.N.)
BLOCK_TENSORS = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


@dataclass
class ExportReport:
    out: Path
    qtype: str
    tensors: int
    size: int
    max_abs_diff: float = float("nan")  # largest |GGUF - source| logit difference on CHECK_TEXT
    relative_diff: float = float("nan")  # max_abs_diff / max(largest |logit|, 1): what the tolerance applies to
    tokenizer_matches: bool | None = None  # the GGUF's tokenizer encodes CHECK_TEXT to the source's ids

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "out": str(self.out)}


def permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's Q/K row order: each head's rotary halves interleaved (transformers' loader undoes it)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(state: dict[str, torch.Tensor], config) -> dict[str, np.ndarray]:
    """The model's weights as float32 arrays under their GGUF names, in llama.cpp's order."""
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    out = {"token_embd.weight": state["model.embed_tokens.weight"]}
    for i in range(config.num_hidden_layers):
        for hf, name in BLOCK_TENSORS.items():
            out[f"blk.{i}.{name}"] = state[f"model.layers.{i}.{hf}"]
    out["output_norm.weight"] = state["model.norm.weight"]
    if not config.tie_word_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    arrays = {k: v.detach().float().cpu().numpy() for k, v in out.items()}
    for i in range(config.num_hidden_layers):
        arrays[f"blk.{i}.attn_q.weight"] = permute(arrays[f"blk.{i}.attn_q.weight"], n_head, n_head)
        arrays[f"blk.{i}.attn_k.weight"] = permute(arrays[f"blk.{i}.attn_k.weight"], n_head, n_kv)
    return arrays


def encode(arr: np.ndarray, qtype: str):
    """(data, raw_dtype) for GGUFWriter.add_tensor; norms and other 1-D tensors stay float32."""
    from gguf import GGMLQuantizationType, quants

    if arr.ndim < 2 or qtype == "f32":
        return arr.astype(np.float32), None
    if qtype == "q8_0" and arr.shape[-1] % 32 == 0:  # Q8_0 blocks hold 32 weights of a row
        return quants.quantize(arr, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return arr.astype(np.float16), None  # f16, or a q8_0 row that does not split into blocks (as llama.cpp does)


def check_supported(config) -> None:
    if config.model_type not in SUPPORTED:
        raise LorakitError(
            f"GGUF export supports Llama-family models (model_type {', '.join(SUPPORTED)}; e.g. SmolLM2, "
            f"TinyLlama, Llama 2/3); this model is {config.model_type!r}. Export it with --format hf instead."
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise LorakitError(f"GGUF export does not handle rope scaling {rope.get('rope_type')!r} yet")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise LorakitError("GGUF export does not handle Llama models with attention or MLP biases yet")


def rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def tokenizer_fields(tokenizer, vocab_size: int) -> dict[str, Any]:
    """Vocabulary, token types and merges of a byte-level BPE tokenizer, as llama.cpp's "gpt2" model."""
    from gguf import TokenType

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "BPE with byte fallback (sentencepiece style)" if model.get("byte_fallback") else model.get("type")
        raise LorakitError(
            "GGUF export handles byte-level BPE tokenizers (GPT-2 style, as SmolLM2 and Llama 3 use); "
            f"this tokenizer is {kind}"
        )
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    added = {t["content"] for t in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        tok = by_id.get(i, f"[PAD{i}]")
        tokens.append(tok)
        kind = TokenType.CONTROL if tok in special else TokenType.USER_DEFINED if tok in added else TokenType.NORMAL
        types.append(TokenType.UNUSED if i not in by_id else kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre_tokenizer_name(spec)}


def pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name for how text is split before BPE: GPT-2's regex, or SmolLM's (digits one by one)."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    if any(s.get("type") == "Digits" and s.get("individual_digits") for s in steps):
        return "smollm"
    return "gpt-2"


def write_gguf(path: Path, model, tokenizer, qtype: str, name: str) -> int:
    """Write the GGUF file; returns the number of tensors."""
    import gguf

    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}.get(qtype, 7))
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_dimension_count(head_dim)
    if head_dim * config.num_attention_heads != config.hidden_size:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_freq_base(rope_theta(config))
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    fields = tokenizer_fields(tokenizer, config.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(fields["pre"])
    w.add_token_list(fields["tokens"])
    w.add_token_types(fields["types"])
    w.add_token_merges(fields["merges"])
    for add, tid in (
        (w.add_bos_token_id, tokenizer.bos_token_id),
        (w.add_eos_token_id, tokenizer.eos_token_id),
        (w.add_unk_token_id, tokenizer.unk_token_id),
        (w.add_pad_token_id, tokenizer.pad_token_id),
    ):
        if tid is not None:
            add(tid)
    # The source tokenizer adds BOS only if encoding an empty string gives it one.
    w.add_add_bos_token(bool(tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]))
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)
    tensors = gguf_tensors(model.state_dict(), config)
    for tname, arr in tensors.items():
        data, raw = encode(arr, qtype)
        w.add_tensor(tname, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return len(tensors)


def check_gguf(path: Path, model, tokenizer, report: ExportReport, plan: Plan) -> None:
    """Reload the file with transformers, where the Plan puts the source; record logit and tokenizer agreement."""
    from transformers import AutoTokenizer

    ids = tokenizer(CHECK_TEXT)["input_ids"]
    loaded = load_model(ModelRef("gguf", str(path.parent), gguf_file=path.name), plan)
    x = torch.tensor([ids], device=plan.device)
    with torch.no_grad():
        ref = model(input_ids=x).logits[0].float()
        got = loaded.eval()(input_ids=x).logits[0].float()
    report.max_abs_diff = float((got - ref).abs().max())
    report.relative_diff = report.max_abs_diff / max(float(ref.abs().max()), 1.0)
    try:
        gguf_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        report.tokenizer_matches = gguf_tok(CHECK_TEXT)["input_ids"] == ids
    except (ValueError, OSError, KeyError):
        report.tokenizer_matches = False


def export_gguf(
    model_dir: Path, out_file: Path, qtype: str = "f16", overwrite: bool = False, verify: bool = True, say=print
) -> ExportReport:
    """Write the model in `model_dir` (a plain transformers folder) as one GGUF file, checked before it is kept."""
    from transformers import AutoConfig, AutoTokenizer

    from lorakit.store.loader import inference_plan

    if qtype not in QTYPES:
        raise LorakitError(f"--quant must be one of {', '.join(QTYPES)}, got {qtype!r}")
    model_dir, out_file = Path(model_dir), Path(out_file).expanduser().resolve()
    if not (model_dir / "config.json").is_file():
        raise LorakitError(f"{model_dir} is not a model directory (no config.json in it)")
    if out_file.is_dir():
        raise LorakitError(f"--out {out_file} is a folder; name the .gguf file to write")
    if out_file.exists() and not overwrite:
        raise LorakitError(f"--out {out_file} exists; use --overwrite to replace it")
    check_supported(AutoConfig.from_pretrained(str(model_dir), local_files_only=True))
    ref = resolve(str(model_dir))
    plan = inference_plan("export", BaseModelSection(name=str(model_dir), dtype="float32"), ref, "float32")
    model = load_model(ref, plan).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out_file)
    tmp = out_file.parent / f".tmp-{out_file.name}-{uuid.uuid4().hex[:8]}"  # hidden, and cleared once stale
    try:
        n = write_gguf(tmp, model, tokenizer, qtype, model_dir.resolve().name)
        report = ExportReport(out_file, qtype, n, tmp.stat().st_size)
        if verify:
            check_gguf(tmp, model, tokenizer, report, plan)
            say(
                f"logits: GGUF ({qtype}) - source at most {report.max_abs_diff:.2e} "
                f"(relative {report.relative_diff:.2e}, tolerance {TOLERANCE[qtype]:g})"
            )
            if not report.relative_diff <= TOLERANCE[qtype]:
                raise LorakitError(
                    f"the GGUF file's logits differ from the source model's by {report.relative_diff:.2e} "
                    f"> tolerance {TOLERANCE[qtype]:g} for {qtype}; nothing written"
                )
            if not report.tokenizer_matches:
                say("warning: transformers' GGUF tokenizer encodes the check text differently from the source")
        with_umask(tmp)
        os.replace(tmp, out_file)
    except OSError as e:
        raise LorakitError(f"could not write {out_file}: {e.strerror or e}; nothing written") from None
    finally:
        tmp.unlink(missing_ok=True)
    return report
