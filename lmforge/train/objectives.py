"""Training objectives: functions (model, batch) -> (summed loss, weight).

The loop divides the summed loss of all micro-batches of a step by their summed weight, so gradient
accumulation gives exactly the mean over the step whatever the padding or masking.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from lmforge.model import Transformer

IGNORE_INDEX = -100  # label value that takes no loss (prompt tokens, padding), as in transformers


class LossOutput(NamedTuple):
    loss_sum: torch.Tensor  # scalar, summed over the units below
    weight: torch.Tensor  # number of units (tokens, pairs, ...) the loss is summed over
    stats: dict[str, torch.Tensor] | None = None  # extra numbers to log, also summed over the units


Objective = Callable[[Transformer, dict[str, torch.Tensor]], LossOutput]


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy (fp32 scalar); labels [B, T] already aligned with logits [B, T, V].

    bf16 logits (autocast) are not upcast first: the kernel computes the log-softmax in fp32 internally, each
    token's loss is rounded to bf16 (relative error <= 2^-9, unbiased) and the sum is taken in fp32. The
    gradient reaching the bf16 logits is bf16 either way, and skipping the fp32 copy of the [B*T, V] logits
    makes a small model's step much cheaper (benchmarks/RESULTS.md)."""
    per_token = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return per_token.float().sum()


def causal_lm(model: Transformer, batch: dict[str, torch.Tensor]) -> LossOutput:
    """Next-token prediction; `position_ids` (packed documents) and `attention_mask` are passed through."""
    logits = model(
        batch["input_ids"], position_ids=batch.get("position_ids"), attention_mask=batch.get("attention_mask")
    )
    labels = batch["labels"]
    return LossOutput(token_cross_entropy(logits, labels), (labels != IGNORE_INDEX).sum())
