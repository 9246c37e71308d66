"""Matmul peak of this machine, measured in the same run as the scenarios (MFU's denominator)."""

from __future__ import annotations

import time


def matmul_gflops(dtype_name: str, seconds: float, n: int = 2048) -> float:
    """Sustained GFLOP/s of n x n @ n x n matmuls in `dtype_name` over about `seconds` seconds."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    for _ in range(2):  # warm-up: thread pool, kernel selection
        torch.mm(a, b)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        torch.mm(a, b)
        count += 1
    elapsed = time.perf_counter() - started
    return 2 * n**3 * count / elapsed / 1e9


def measure(seconds: float) -> dict:
    import torch

    return {
        "fp32_gflops": round(matmul_gflops("fp32", seconds), 1),
        "bf16_gflops": round(matmul_gflops("bf16", seconds), 1),
        "size": 2048,
        "seconds_each": seconds,
        "threads": torch.get_num_threads(),
    }
