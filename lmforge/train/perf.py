"""Throughput accounting: training FLOPs per token and this machine's measured matmul peak (for MFU)."""

from __future__ import annotations

import functools
import time

import torch

from lmforge.config import ModelConfig
from lmforge.info import count_parameters


def training_flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """6 * (matmul parameters) + 12 * L * H * d * T (PaLM appendix B).

    Unlike `lmforge info` (REFERENCE.md's 6N with N non-embedding), the output projection is counted: it
    is a real [h, V] matmul on every token, and in small models it is a large share of the work."""
    _, non_embedding = count_parameters(config)
    matmul_params = non_embedding + config.vocab_size * config.hidden_size
    return 6 * matmul_params + 12 * config.num_layers * config.num_heads * config.head_dim * seq_len


@functools.lru_cache(maxsize=4)
def matmul_peak_flops(dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 0.3) -> float:
    """Best observed FLOP/s of an n x n matmul on this machine with the current thread count."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b  # warm up the kernel selection and caches
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        a @ b
        dt = time.perf_counter() - t0
        best = max(best, 2 * n**3 / dt)
    return best
