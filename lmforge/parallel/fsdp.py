"""FSDP2 (torch.distributed.fsdp.fully_shard): each rank keeps 1/N of every parameter, gradient and optimizer
state; a block's parameters are all-gathered just before it runs and its gradients reduce-scattered
right after its backward.

One FSDP unit per block, then the root (embedding, final norm, output: a tied output matrix stays with
the embedding it is). Parameters become DTensors sharded on dim 0 over the "dp" mesh (on a 2-D mesh over
the "dp" dimension of the tensor-parallel DTensors).
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from lmforge.model import Transformer


def apply_fsdp(
    model: Transformer,
    dp_mesh: DeviceMesh,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype = torch.float32,
    cpu_offload: bool = False,
) -> Transformer:
    """Shard `model` in place over `dp_mesh` and return it (its class becomes FSDP's subclass of it).

    param_dtype: the dtype the all-gathered parameters (and so the compute) take, e.g. bfloat16; None keeps
        the stored fp32. The sharded master parameters and optimizer state stay fp32.
    reduce_dtype: the dtype gradients are averaged in; fp32 so that a sum over many ranks is not rounded
        to bf16's 8 bits (torchtitan's default).
    cpu_offload: keep the sharded parameters, gradients and optimizer state in CPU memory (CPUOffloadPolicy);
        the optimizer step then runs on the CPU. Pinned memory only where CUDA is present.
    Gradients reaching the parameters are the mean over the dp ranks (as DDP's).
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    offload: OffloadPolicy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    last = len(model.layers) - 1
    for i, block in enumerate(model.layers):
        # The last block's parameters would be gathered again at once for its backward: keep them.
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=i < last)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, offload_policy=offload)
    return model
