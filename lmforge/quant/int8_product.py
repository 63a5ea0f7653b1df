"""The exact int8 x int8 -> int32 product of W8A8's prefill rows, on whichever of two ways is faster here.

torch._int_mm is the obvious kernel, but on CPUs without AVX-512 VNNI torch 2.13 runs it ~14x slower than
an fp32 GEMM of the same shape (260 ms against 18 ms for 128 rows of a 4864x896 layer on a 2-core AVX2
EPYC; benchmarks/RESULTS.md), which made a 128-token W8A8 prefill take 21 s there. An fp32 GEMM of int8
values is exact as long as no partial sum can leave fp32's 24-bit integer range: each product is at most
128 * 128 = 2^14 in magnitude, so over chunks of at most 2^10 inputs every partial sum is an integer of at
most 2^24, whatever order the BLAS adds in. The chunks' sums are then added in int32. Both ways give the
same int32 result bit for bit, so choosing between them (timed once per process) changes speed only.
"""

from __future__ import annotations

import functools
import time

import torch

EXACT_CHUNK = 1024  # inputs per fp32 product: 1024 * 2^14 = 2^24, the largest exactly held magnitude
WEIGHT_ROWS = 4096  # outputs per block: a 16 MB fp32 copy of the weight per chunk


def int8_product(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a [M, K] int8 @ w [N, K]^T int8 -> [M, N] int32, exact."""
    if _float_is_faster() and _fp32_is_exact():
        return float_product(a, w)
    return torch._int_mm(a, w.t())


def float_product(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The same product through fp32 GEMMs of at most EXACT_CHUNK inputs each (module docstring), over
    blocks of WEIGHT_ROWS outputs so that the fp32 copy of the weight never exceeds one block (an output
    head of 150k rows would otherwise need a 0.5 GB copy)."""
    a32 = a.float()
    out = torch.empty(a.shape[0], w.shape[0], dtype=torch.int32, device=a.device)
    for n in range(0, w.shape[0], WEIGHT_ROWS):
        rows = w[n : n + WEIGHT_ROWS]
        acc = None
        for k in range(0, a.shape[1], EXACT_CHUNK):
            part = torch.mm(a32[:, k : k + EXACT_CHUNK], rows[:, k : k + EXACT_CHUNK].float().t()).to(torch.int32)
            acc = part if acc is None else acc.add_(part)
        out[:, n : n + WEIGHT_ROWS] = acc
    return out


def _fp32_is_exact() -> bool:
    """A lowered fp32 matmul precision (torch.set_float32_matmul_precision, oneDNN's bf16 modes) rounds the
    inputs: then only _int_mm is exact."""
    mkldnn = getattr(torch.backends.mkldnn, "matmul", None)
    lowered = getattr(mkldnn, "fp32_precision", "none") not in ("none", "ieee")
    return torch.get_float32_matmul_precision() == "highest" and not lowered


@functools.cache
def _float_is_faster() -> bool:
    """Time both on a prefill-sized product, best of 3 after a first call each."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 128, (64, 1024), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (1024, 1024), dtype=torch.int8, generator=g)
    times = {}
    for way in (float_product, lambda a, w: torch._int_mm(a, w.t())):
        with torch.inference_mode():
            way(a, w)
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                way(a, w)
                best = min(best, time.perf_counter() - t0)
        times[way is float_product] = best
    return times[True] < times[False]
