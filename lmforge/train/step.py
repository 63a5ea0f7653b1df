"""One training step in two parts, as torchtitan splits it: the forward/backward over a step's micro-batches,
then the optimizer step. The run around them (schedule, logging, evaluation, checkpoints) is loop.py.

Across data-parallel ranks the gradient is the exact mean over every token of the global batch: each
micro-batch's summed loss is backpropagated, and the gradients are then scaled by the data-parallel degree
over the global weight (one all-reduce; DDP and FSDP average over the ranks). Gradients are synchronised on
the last micro-batch only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmforge.parallel.step import grad_sync, normalize_grads
from lmforge.runtime import autocast
from lmforge.train.objectives import Objective


@dataclass
class StepResult:
    loss: float  # the global batch's mean loss (over every rank)
    weight: float  # the global batch's weight (tokens, or pairs for DPO)
    tokens: int  # input tokens this rank read
    stats: dict[str, float] = field(default_factory=dict)  # the objective's statistics, per unit of weight


def _all_reduce(values: list[float], group: dist.ProcessGroup | None, device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    return t.tolist()


def forward_backward(
    model: nn.Module,
    micro_batches: Sequence[dict[str, torch.Tensor]],
    objective: Objective,
    autocast_dtype: torch.dtype | None,
    device: torch.device,
    mesh: Any = None,
) -> StepResult:
    """Forward and backward each micro-batch's summed loss (gradient sync on the last one only: DDP needs
    the forward inside no_sync too), then scale the gradients to the global mean (see the module docstring)."""
    loss_sum, local_weight, stats = 0.0, 0.0, {}
    for i, batch in enumerate(micro_batches):
        with grad_sync(model, enabled=i == len(micro_batches) - 1):
            with autocast(autocast_dtype, device):
                out = objective(model, batch)
            out.loss_sum.backward()
        loss_sum += float(out.loss_sum.detach())
        local_weight += float(out.weight)
        for name, value in (out.stats or {}).items():
            stats[name] = stats.get(name, 0.0) + float(value)
    params = [p for p in model.parameters() if p.requires_grad]
    weight = normalize_grads(params, local_weight, mesh)
    names = sorted(stats)
    group = mesh["dp"].get_group() if mesh is not None and "dp" in (mesh.mesh_dim_names or ()) else None
    totals = _all_reduce([loss_sum, *[stats[n] for n in names]], group, device)
    total = max(weight, 1.0)
    tokens = sum(int(b["input_ids"].numel()) for b in micro_batches)
    per_weight = {n: v / total for n, v in zip(names, totals[1:], strict=True)}
    return StepResult(totals[0] / total, total, tokens, per_weight)


def optimizer_step(
    optimizer: torch.optim.Optimizer, params: list[torch.Tensor], grad_clip: float, loss: float
) -> tuple[float, bool]:
    """Clip and step unless the loss or the gradient is not finite; (gradient norm, whether it stepped).
    Gradients are cleared either way."""
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):  # a DTensor under tensor parallelism / FSDP
        norm = norm.full_tensor()
    grad_norm = float(norm)
    ok = math.isfinite(loss) and math.isfinite(grad_norm)
    if ok:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, ok
