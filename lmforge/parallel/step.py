"""What the training step needs under a strategy: the loss context, gradient accumulation without
redundant syncs, the exact global token mean, and which slice of the data this rank reads.

The step these helpers make exact under every strategy (mesh from build_mesh, step_model and config
from parallelize):

    index, count = dp_coords(mesh)                 # the loader reads shard `index` of `count`
    weight = 0.0
    for i, b in enumerate(micro_batches):
        with grad_sync(step_model, i == len(micro_batches) - 1), loss_context(config):
            out = objective(step_model, b)
            out.loss_sum.backward()                # the summed loss: no division yet
        weight += float(out.weight)
    normalize_grads(model.parameters(), weight, mesh)  # now the gradient of the global mean
    clip_grad_norm_ ...; optimizer.step()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import loss_parallel as _loss_parallel
from torch.nn.parallel import DistributedDataParallel

from lmforge.parallel.mesh import ParallelConfig


def loss_context(config: ParallelConfig) -> contextlib.AbstractContextManager:
    """`loss_parallel()` when the logits stay sharded over the vocabulary (config.loss_parallel), else a
    no-op. The forward's cross-entropy AND its backward() must both run inside it."""
    return _loss_parallel() if config.loss_parallel else contextlib.nullcontext()


@contextlib.contextmanager
def grad_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Inside: backward passes of `module` (what parallelize returned) reduce gradients over the dp ranks
    only if `enabled`. For gradient accumulation, disable it on every micro-batch but the last:

        for i, b in enumerate(micro):
            with grad_sync(step_model, i == len(micro) - 1):
                loss(b).backward()

    DDP: no_sync() (gradients accumulate locally, one all-reduce at the end). FSDP2: set_requires_gradient_sync
    (unsharded gradients accumulate locally: fewer reduce-scatters, but a full gradient's memory per rank;
    keep syncing every micro-batch when memory is what FSDP is for). Otherwise a no-op."""
    if isinstance(module, DistributedDataParallel):
        with contextlib.nullcontext() if enabled else module.no_sync():
            yield
        return
    setter = getattr(module, "set_requires_gradient_sync", None)  # FSDPModule (fully_shard)
    if setter is None or enabled:
        yield
        return
    setter(False)
    try:
        yield
    finally:
        setter(True)


def dp_coords(mesh: DeviceMesh | None) -> tuple[int, int]:
    """(this rank's index among the data-parallel replicas, their number): the data loader's shard.

    The TP ranks of one group read the same batch, so under tp they are (0, 1) and under fsdp+tp the
    coordinate along "dp"; one process is (0, 1)."""
    if mesh is None or "dp" not in (mesh.mesh_dim_names or ()):
        return 0, 1
    dp = mesh["dp"]
    return dp.get_local_rank(), dp.size()


def normalize_grads(params: Iterable[torch.Tensor], weight: float | torch.Tensor, mesh: DeviceMesh | None) -> float:
    """After the backward passes of a step's micro-batches on their SUMMED losses (no division), scale the
    gradients in place into the exact gradient of the mean over every unit (token, pair) of the global
    step, and return that global weight (all ranks' `weight`s summed over the dp ranks).

    DDP and FSDP average gradients over the dp ranks, so the factor is dp_size / global weight. Dividing each
    rank's loss by its own weight instead would give a mean of per-rank means, wrong when the ranks hold
    different numbers of tokens (masking, padding); and dividing by the global weight before backward would
    need every micro-batch's weight before the first backward. One all-reduce of one number per step."""
    _, size = dp_coords(mesh)
    total = float(weight)
    if size > 1:
        assert mesh is not None
        t = torch.tensor(total, dtype=torch.float64, device=mesh["dp"].device_type)
        dist.all_reduce(t, group=mesh["dp"].get_group())
        total = float(t)
    grads = [p.grad for p in params if p.grad is not None]
    if grads and total > 0:
        torch._foreach_mul_(grads, size / total)
    return total
