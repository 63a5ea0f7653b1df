"""DistributedDataParallel: every rank keeps the whole model and sees 1/N of the global batch; gradients are
all-reduced (averaged) in buckets while the backward pass is still running."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh) -> DistributedDataParallel:
    """`model` wrapped for data parallelism over the 1-D `dp_mesh` (gloo on CPU, nccl on CUDA).

    The wrapper is what the loop must call forward on (its hooks start the all-reduces); the Transformer
    itself stays reachable as `.module` for its config, state dict and export. Ranks start from rank 0's
    weights (DDP broadcasts them at construction)."""
    return DistributedDataParallel(model, device_mesh=dp_mesh)
