"""Throughput accounting: training FLOPs per token and this machine's measured matmul peak (for MFU)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import sys
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


@functools.lru_cache(maxsize=8)
def matmul_peak_flops(
    dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 0.3, device: str = "cpu"
) -> float:
    """Best observed FLOP/s of an n x n matmul on `device` in `dtype` with the current thread count.

    A dtype with a slow path (bf16 on an AVX2-only CPU: ~1 GFLOP/s) is measured on a smaller matrix so that
    the measurement itself stays short."""
    from lmforge.runtime import probe_precision

    p = probe_precision(device)
    if device == "cpu" and dtype == torch.bfloat16 and p.bfloat16_flops < 0.1 * p.float32_flops:
        n = 256
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b  # warm up the kernel selection and caches
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == 0.0:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        best = max(best, 2 * n**3 / dt)
    return best


def measured_training_rate(
    config: ModelConfig, dtype: str, batch_size: int, seq_len: int, optimizer: str = "adamw", steps: int = 3
) -> float:
    """Best tokens/s of `steps` training steps as the loop runs them (forward in `dtype` autocast, backward,
    clip, optimizer step) of a fresh CPU model of `config` on random tokens, after one warm-up step.

    This is what a small model actually gets: the matmul peak says little about bf16 at small shapes,
    where the casts and elementwise work around the matmuls dominate (docs/LOG.md)."""
    from lmforge.model import Transformer
    from lmforge.runtime import autocast
    from lmforge.train.objectives import causal_lm
    from lmforge.train.optim import build_optimizer

    g = torch.Generator().manual_seed(0)
    model = Transformer(config).train()
    opt = build_optimizer(model, 1e-3, kind=optimizer)
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), generator=g)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    best = math.inf
    for step in range(steps + 1):
        t0 = time.perf_counter()
        with autocast(dtype, "cpu"):
            out = causal_lm(model, batch)
        (out.loss_sum / out.weight).backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(out.loss_sum.detach())
        if step:  # the first step pays for kernel selection and allocations
            best = min(best, time.perf_counter() - t0)
    return batch_size * seq_len / best


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


@functools.lru_cache(maxsize=1)
def tune_allocator() -> bool:
    """Keep freed activation memory in the process instead of returning it to the OS (glibc only).

    glibc serves allocations above 128 KiB with fresh mmap()s and unmaps them on free, so every training
    step page-faults all of its large activations and gradients again; on this machine that was nearly half
    the step time of a small model (benchmarks/RESULTS.md). Raising the mmap and trim thresholds makes freed
    blocks reusable, as the tcmalloc/jemalloc setups recommended for PyTorch on CPU do. Returns whether
    the setting was applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Blocks up to 1 GiB come from the heap; the heap is never trimmed below 2 GiB of free space.
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))
