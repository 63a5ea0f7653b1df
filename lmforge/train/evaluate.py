"""Validation during training: the mean loss of an objective over held-out batches, and bits per byte."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.runtime import autocast, model_device
from lmforge.train.objectives import Objective, causal_lm


@torch.no_grad()
def evaluate(
    model: Transformer,
    batches: Iterator[dict[str, torch.Tensor]],
    objective: Objective = causal_lm,
    token_bytes: torch.Tensor | None = None,
    max_batches: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Mean loss (and the objective's statistics) over the batches, and bits per byte when the byte length of
    each token is known."""
    was_training = model.training
    model.eval()
    loss_sum, weight, nbytes = 0.0, 0.0, 0
    stats: dict[str, float] = {}
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        with autocast(autocast_dtype, model_device(model)):
            out = objective(model, batch)
        loss_sum += float(out.loss_sum)
        weight += float(out.weight)
        for name, value in (out.stats or {}).items():
            stats[name] = stats.get(name, 0.0) + float(value)
        if token_bytes is not None:
            labels = batch["labels"]
            nbytes += int(token_bytes[labels.clamp(min=0)][labels >= 0].sum())
    model.train(was_training)
    if weight == 0:
        raise LmforgeError("the validation data produced no tokens to score; give more validation text.")
    result = {"val_loss": loss_sum / weight, **{f"val_{k}": v / weight for k, v in stats.items()}}
    if nbytes:
        result["val_bpb"] = loss_sum / math.log(2) / nbytes
    return result
