"""AdamW with decoupled weight decay on matrices only (or Muon, lmforge.train.muon), and learning-rate schedules.

Schedules are functions of progress p in [0, 1] after a linear warmup in steps, so that a run bounded by
a time budget can follow the same curve as one bounded by a step count.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.errors import LmforgeError

SCHEDULES = ("cosine", "wsd", "constant", "linear")
OPTIMIZERS = ("adamw", "muon")  # muon: Muon for hidden matrices, AdamW for the rest


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict]:
    """Decay 2-D weight matrices; never norms or biases; embeddings only when asked (GPT-3/Llama practice)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        is_embedding = id(p) in embeddings
        (decay if p.dim() >= 2 and (decay_embeddings or not is_embedding) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    decay_embeddings: bool = False,
    kind: str = "adamw",
    momentum: float = 0.95,
) -> torch.optim.Optimizer:
    """AdamW (`kind="adamw"`), using the fused kernel when every parameter's device supports it (one pass
    over memory); or `kind="muon"`: Muon with `momentum` for the hidden matrices and AdamW for the rest,
    all at the same learning rate (lmforge.train.muon)."""
    if kind not in OPTIMIZERS:
        raise LmforgeError(f"unknown optimizer {kind!r}; use one of {', '.join(OPTIMIZERS)}.")
    if kind == "muon":
        from lmforge.train.muon import Muon, muon_param_groups

        groups = muon_param_groups(model, weight_decay, decay_embeddings)
        if not groups:
            raise LmforgeError("the model has no trainable parameters; nothing to optimise.")
        return Muon(groups, lr=lr, momentum=momentum, betas=betas, eps=eps)
    groups = param_groups(model, weight_decay, decay_embeddings)
    if not groups:
        raise LmforgeError("the model has no trainable parameters; nothing to optimise.")
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = devices <= {"cpu", "cuda"} and all(p.dtype.is_floating_point for g in groups for p in g["params"])
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
    except (RuntimeError, TypeError):  # an older torch or an unsupported dtype: the foreach kernel is exact too
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def lr_multiplier(
    step: int, progress: float, warmup_steps: int, schedule: str, min_lr_ratio: float = 0.1, decay_fraction: float = 0.2
) -> float:
    """Multiplier of the peak learning rate at `step` (0-based) with overall progress in [0, 1].

    cosine: half a cosine from 1 down to min_lr_ratio; wsd: warmup-stable-decay (Hu et al. 2024,
    MiniCPM), flat then linear to min_lr_ratio over the last `decay_fraction`; linear: straight down;
    constant: 1 after warmup.
    """
    if schedule not in SCHEDULES:
        raise LmforgeError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}.")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    p = min(max(progress, 0.0), 1.0)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    if schedule == "linear":
        return 1.0 - (1 - min_lr_ratio) * p
    start = 1.0 - decay_fraction
    if p <= start:
        return 1.0
    return 1.0 - (1 - min_lr_ratio) * (p - start) / decay_fraction
