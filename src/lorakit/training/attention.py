"""Attention for padding-free packed batches on the CPU: each document attends only to itself.

Packed training puts a batch's documents one after another in a single row, with position ids that
restart at 0 for each document. transformers' `sdpa` then builds one [tokens x tokens] mask that
keeps the documents apart and runs attention over the whole row: for a row of 1,024 tokens made of
short documents, almost all of that work is on pairs that the mask throws away, and the masked
kernel also needs the key/value heads copied out for grouped-query attention. `packed_sdpa` runs
causal attention on each document's span instead (the same softmax over the same keys, so the same
result up to rounding), and hands every other case (batches of several rows, a KV cache, sliding
windows, soft-capping, position ids that do not describe packed documents) to transformers' own
`sdpa` attention unchanged.

`use_packed_attention(model)` switches a model that uses `sdpa` to it; flash-attention kernels do the
same on a GPU, so lorakit only does this on the CPU.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from lorakit import internals

NAME = "lorakit_packed_sdpa"


def document_spans(position_ids: torch.Tensor | None, length: int) -> list[tuple[int, int]] | None:
    """[(start, end)] of each packed document in a one-row batch, or None if the row is not packed
    documents (positions must start at 0 and go up by one, restarting at 0 at each document)."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape != (1, length):
        return None
    pos = position_ids[0]
    if length == 0 or int(pos[0]) != 0:
        return None
    steps = pos[1:] - pos[:-1]
    starts = pos[1:] == 0
    if not bool(((steps == 1) | starts).all()):
        return None
    cuts = [0, *(torch.nonzero(starts).flatten() + 1).tolist(), length]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def packed_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query [1, heads, L, d], key/value [1, kv_heads, L, d];
    returns [1, L, heads, d] like transformers' `sdpa`."""
    spans = None
    plain = (
        query.shape[0] == 1
        and query.shape[2] == key.shape[2]
        and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
        and kwargs.get("sliding_window") is None
        and kwargs.get("softcap") is None
        and kwargs.get("position_bias") is None
        and kwargs.get("cache") is None
        and not kwargs.get("output_attentions", False)
    )
    if plain:
        spans = document_spans(kwargs.get("position_ids"), query.shape[2])
    if spans is None:
        return sdpa()(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    gqa = query.shape[1] != key.shape[1]
    dtype = query.dtype
    # On the CPU, attention runs in float32: there its kernels are as fast as in bf16 (measured), and bf16
    # attention goes through oneDNN, which builds and keeps kernels for every document length it meets (the
    # process grew by tens of MB a step).
    upcast = query.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)
    if upcast:
        query, key, value = query.float(), key.float(), value.float()
    with torch.autocast(query.device.type, enabled=False) if upcast else contextlib.nullcontext():
        outs = [
            F.scaled_dot_product_attention(
                query[:, :, s:e],
                key[:, :, s:e],
                value[:, :, s:e],
                dropout_p=dropout,
                is_causal=True,
                scale=scaling,
                enable_gqa=gqa,
            )
            for s, e in spans
        ]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2).contiguous().to(dtype), None


# A packed row is padded to a multiple of this many tokens (see pad_packed_row).
ROW_MULTIPLE = 64


def pad_packed_row(inputs: dict, multiple: int, pad_id: int) -> dict:
    """Pad a one-row packed batch to a multiple of `multiple` tokens with one more document of padding.

    oneDNN, which runs the CPU's matmuls, builds and caches a kernel (and a reordered copy of the weights) for
    every new shape. A padding-free packed row has a different length at almost every step, so every step
    built new ones, and the caches grew the process by 20-40 MB a step until they filled (1,024 entries).
    With lengths rounded up, a run sees a handful of shapes. The padding is a document of its own (positions
    from 0, labels -100): nothing attends to it and it adds nothing to the loss."""
    ids = inputs.get("input_ids")
    pos = inputs.get("position_ids")
    if ids is None or pos is None or ids.dim() != 2 or ids.shape[0] != 1 or "attention_mask" in inputs:
        return inputs
    extra = -ids.shape[1] % multiple
    if extra == 0:
        return inputs
    out = dict(inputs)
    out["input_ids"] = torch.cat([ids, ids.new_full((1, extra), pad_id)], dim=1)
    out["position_ids"] = torch.cat([pos, torch.arange(extra, dtype=pos.dtype, device=pos.device)[None]], dim=1)
    for key in ("labels", "shift_labels"):
        if inputs.get(key) is not None:
            out[key] = torch.cat([inputs[key], inputs[key].new_full((1, extra), -100)], dim=1)
    return out


def uses_packed_attention(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    return config is not None and internals.attn_implementation(config) == NAME


@functools.cache
def sdpa():
    """transformers' own `sdpa` attention, which `packed_sdpa` hands every case it does not handle."""
    from transformers import AttentionInterface

    return AttentionInterface()["sdpa"]


def register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(NAME, packed_sdpa)
    # The mask is still made as for sdpa: the cases handed back to transformers' sdpa need it.
    AttentionMaskInterface.register(NAME, AttentionMaskInterface()["sdpa"])


def use_packed_attention(model) -> bool:
    """Switch a model (or a peft model around it) from `sdpa` to `packed_sdpa`; True if it did."""
    config = getattr(model, "config", None)
    if config is None or internals.attn_implementation(config) != "sdpa":
        return False
    register()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        base.set_attn_implementation(NAME)
    except (ValueError, AttributeError):
        return False
    return internals.attn_implementation(base.config) == NAME
