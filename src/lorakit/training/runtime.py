"""How a training process uses its hardware: the adapter's dtype, and the CPU's kernel cache and allocator. Each
measure is measured in bench/ (see bench/results/memory.md). The measures that set peft's and bitsandbytes' layers
under autocast touch those libraries' internals and live in `lorakit.internals`."""

from __future__ import annotations

import os

import torch


def adapter_in_float32(model) -> int:
    """Hold the trainable adapter weights in float32 (TRL casts a quantized model's LoRA weights to bf16).

    An update of lr 2e-4 to a LoRA weight of 0.01-0.1 is at or below bf16's resolution (2^-8 of the weight), so
    bf16 adapter weights round many of Adam's steps away. Autocast still runs the adapter's matmuls in bf16
    (it caches the cast of a trainable weight once per forward). Returns the number of tensors cast."""
    cast = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
            cast += 1
    return cast


def bound_cpu_kernel_cache() -> None:
    """Keep PyTorch's oneDNN computation cache small (64 entries instead of 1,024), unless the user set it.

    On the CPU, bitsandbytes dequantizes a 4-bit weight into a new tensor at every use, and PyTorch caches a
    oneDNN computation for each: a QLoRA run grew by 20-30 MB a step (SmolLM2-135M: 839 -> 1151 MB resident
    over 12 steps, peak 1802 MB; with 64 entries 833 -> 945 MB, peak 1456-1498 MB, steps as fast). Read when
    the cache is first used, so this only takes effect in a process that has not run a oneDNN matmul yet."""
    os.environ.setdefault("LRU_CACHE_CAPACITY", "64")


def release_freed_memory() -> bool:
    """Return the memory freed during a training step to the OS (glibc's malloc_trim; elsewhere a no-op).

    glibc keeps freed blocks for reuse, and with a different number of tokens in every packed batch they
    fragment: the process grew by 20-40 MB a step without it (QLoRA on SmolLM2-135M: peak 1750 vs 1600 MB
    after 12 steps; LoRA about 3300 vs 3070 MB), at no measurable cost in tokens/s.
    """
    import ctypes

    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))  # the C library the process already uses
    except (OSError, AttributeError):  # not glibc
        return False
