"""`parallelize(model, config, mesh)`: every pass that prepares a model for distributed training, applied
once, in torchtitan's fixed order:

    tensor parallel -> activation checkpointing -> compile -> FSDP (or DDP)

TP first, because it replaces parameters by DTensors that the later passes must see; checkpointing wraps
the (TP) blocks; compile traces the wrapped blocks; FSDP/DDP go last because they shard or all-reduce
whatever parameters the model then has.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.parallel.checkpointing import apply_checkpointing
from lmforge.parallel.compile import apply_compile
from lmforge.parallel.ddp import apply_ddp
from lmforge.parallel.fsdp import apply_fsdp
from lmforge.parallel.mesh import ParallelConfig
from lmforge.parallel.tp import apply_tp

_APPLIED = "_lmforge_parallelized"  # set on the model once the passes ran


def _submesh(mesh: DeviceMesh, name: str, strategy: str) -> DeviceMesh:
    names = mesh.mesh_dim_names or ()
    if name not in names:
        raise LmforgeError(
            f"strategy {strategy} needs a mesh with a {name!r} dimension, got dimensions {names}; "
            "build it with lmforge.parallel.mesh.build_mesh."
        )
    return mesh[name]


def parallelize(
    model: Transformer,
    config: ParallelConfig,
    mesh: DeviceMesh | None,
    *,
    compile: bool,
    dtype: str,
    checkpointing: str = "none",
    checkpoint_every: int = 2,
) -> nn.Module:
    """Apply `config`'s passes to `model` (in place) and return the module the training step calls.

    That is `model` itself, except under DDP, where it is the DistributedDataParallel wrapper (keep `model`
    for its config, state dict and export). `mesh` comes from `build_mesh`; None (one process) applies only
    activation checkpointing and compile. `dtype` is the resolved training dtype ("float32" or "bfloat16",
    see lmforge.runtime.training_dtype): under FSDP bfloat16 becomes the parameters' compute dtype, with
    gradients reduced in fp32. `checkpointing` and `checkpoint_every` choose the blocks that recompute their
    activations (lmforge.parallel.checkpointing; TrainConfig's activation_checkpointing and checkpoint_every).

    Before the call the model holds its weights on its device, the same on every rank: TP scatters rank 0's
    values, DDP broadcasts rank 0's, FSDP keeps each rank's own shard of its own copy (seed alike or load
    the same checkpoint). Call it once, before building the optimizer (which must see the new parameters).
    """
    if getattr(model, _APPLIED, False):
        raise LmforgeError("this model was already parallelized; parallelize() must run once, before the loop.")
    if dtype not in ("float32", "bfloat16"):
        raise LmforgeError(f"parallelize needs the resolved training dtype float32 or bfloat16, got {dtype!r}.")
    strategy = config.parallel
    if mesh is None and config.fsdp_cpu_offload:
        raise LmforgeError(
            "fsdp_cpu_offload needs FSDP, which needs a process group: launch with torchrun "
            "(--nproc-per-node 1 is enough) and build the mesh with build_mesh."
        )
    if mesh is not None and strategy == "none":
        raise LmforgeError("strategy none takes no device mesh; pass mesh=None or choose a strategy.")

    if mesh is not None and strategy in ("tp", "fsdp+tp"):
        apply_tp(
            model,
            _submesh(mesh, "tp", strategy),
            sequence_parallel=config.sequence_parallel,
            loss_parallel=config.loss_parallel,
        )
    apply_checkpointing(model, checkpointing, checkpoint_every)
    if compile:
        apply_compile(model)
    out: nn.Module = model
    if mesh is not None and strategy in ("fsdp", "fsdp+tp"):
        param_dtype = torch.bfloat16 if dtype == "bfloat16" else None
        apply_fsdp(model, _submesh(mesh, "dp", strategy), param_dtype=param_dtype, cpu_offload=config.fsdp_cpu_offload)
    elif mesh is not None and strategy == "ddp":
        out = apply_ddp(model, _submesh(mesh, "dp", strategy))
    setattr(model, _APPLIED, True)
    return out
