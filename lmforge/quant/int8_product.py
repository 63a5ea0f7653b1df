"""The exact int8 x int8 -> int32 product of W8A8's prefill rows, on whichever of two ways is faster here.

torch._int_mm is the obvious kernel, but on CPUs without AVX-512 VNNI torch 2.13 runs it ~14x slower than
an fp32 GEMM of the same shape (260 ms against 18 ms for 128 rows of a 4864x896 layer on a 2-core AVX2
EPYC; benchmarks/RESULTS.md), which made a 128-token W8A8 prefill take 19 s there. An fp32 GEMM of int8
values is exact as long as no partial sum can leave fp32's 24-bit integer range: each product is at most
128 * 128 = 2^14 in magnitude, so over chunks of at most 2^10 inputs every partial sum is an integer of at
most 2^24, whatever order the BLAS adds in. The chunks' sums are then added in int32. Both ways give the
same int32 result bit for bit, so choosing between them (timed once per process) changes speed only.

Inputs of a few rows (decode steps) go instead one row at a time through FBGEMM's dynamic-quantized kernel
(lmforge.quant.layers); up to how many rows that loop beats one exact product is timed here too: 8-16 on
the AVX2 EPYC (1.3 ms against 3.9 ms for 8 rows of a 4864x896 layer), where a fixed 4 had been chosen on an
AVX-512 VNNI machine whose _int_mm is fast.
"""

from __future__ import annotations

import functools
import warnings

import torch

from lmforge.quant.timing import best_seconds

ROW_LIMITS = (1, 2, 4, 8, 16, 32)  # the row counts fbgemm_row_limit chooses among
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


def fbgemm_pack(qweight: torch.Tensor, scales: torch.Tensor) -> object | None:
    """The weight packed for torch.ops.quantized.linear_dynamic (None where this torch lacks FBGEMM)."""
    try:
        with warnings.catch_warnings():  # torch marks its quantized tensors deprecated; the op stays
            warnings.simplefilter("ignore")
            q = torch._make_per_channel_quantized_tensor(
                qweight, scales.double(), torch.zeros_like(scales, dtype=torch.long), 0
            )
            return torch.ops.quantized.linear_prepack(q, None)
    except (AttributeError, RuntimeError, NotImplementedError):
        return None


def fbgemm_rows(x: torch.Tensor, packed: object) -> torch.Tensor:
    """x [M, K] fp32 through FBGEMM one row at a time (its kernel quantizes a whole input with one range)."""
    if x.shape[0] == 1:
        return torch.ops.quantized.linear_dynamic(x, packed, True)
    return torch.cat([torch.ops.quantized.linear_dynamic(row, packed, True) for row in x.split(1)])


@functools.cache
def fbgemm_row_limit() -> int:
    """How many rows (of ROW_LIMITS) the FBGEMM row loop takes before one exact product is faster (row_limit):
    both timed on a 1024x1024 layer at each count, best of 3; 0 where FBGEMM is missing."""
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (1024, 1024), dtype=torch.int8, generator=g)
    packed = fbgemm_pack(w, torch.full((1024,), 0.01))
    if packed is None:
        return 0
    seconds = {}  # rows -> (the FBGEMM row loop, one exact product)
    for m in ROW_LIMITS[1:]:
        x = torch.randn(m, 1024, generator=g)
        a = torch.randint(0, 128, (m, 1024), dtype=torch.int8, generator=g)
        seconds[m] = (best_seconds(lambda x=x: fbgemm_rows(x, packed)), best_seconds(lambda a=a: int8_product(a, w)))
    return row_limit(seconds)


def row_limit(seconds: dict[int, tuple[float, float]]) -> int:
    """Up the row counts, the last at which the row loop still wins, before it first loses (its cost grows
    with the rows, the product's barely: a later win is noise); ROW_LIMITS[0] when it never wins."""
    limit = ROW_LIMITS[0]
    for m in sorted(seconds):
        rows, exact = seconds[m]
        if rows > exact:
            break
        limit = m
    return limit


@functools.cache
def _float_is_faster() -> bool:
    """Time both on a prefill-sized product, best of 3 after a first call each."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 128, (64, 1024), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (1024, 1024), dtype=torch.int8, generator=g)
    return best_seconds(lambda: float_product(a, w)) < best_seconds(lambda: torch._int_mm(a, w.t()))
