"""The one timing rule behind the quantized layers' measured choices (compute dtype, exact product, row limit)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def best_seconds(op: Callable[[], object], repeats: int = 3) -> float:
    """Seconds of op's fastest of `repeats` calls, after a first that may build kernels or layouts."""
    with torch.inference_mode():
        op()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            op()
            best = min(best, time.perf_counter() - t0)
    return best
