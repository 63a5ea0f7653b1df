"""The one held-out splitter: documents for `lmforge prepare`, examples for fine-tuning, pairs for DPO."""

from __future__ import annotations

import numpy as np

from lmforge.errors import LmforgeError


def check_val_fraction(val_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise LmforgeError(f"val_fraction must be in [0, 1), got {val_fraction}.")


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Train and val document indices (each sorted): a seeded random `val_fraction` of the documents,
    at least one when there are two or more documents and val_fraction > 0, and never all of them."""
    check_val_fraction(val_fraction)
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    else:
        n_val = 0
    val = np.sort(np.random.default_rng(seed).permutation(n)[:n_val])
    is_val = np.zeros(n, dtype=bool)
    is_val[val] = True
    return np.flatnonzero(~is_val).tolist(), val.tolist()
