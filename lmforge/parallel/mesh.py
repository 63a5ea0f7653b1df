"""ParallelConfig (how a run is spread over its processes) and the DeviceMesh it implies.

strategy   mesh                          what each rank holds
none       None (one process)            the whole model, the whole batch
ddp        1-D ("dp",) of N              the whole model; 1/N of the global batch; gradients all-reduced
fsdp       1-D ("dp",) of N              1/N of every parameter (FSDP2); 1/N of the batch
tp         1-D ("tp",) of N              1/N of every block's heads and ffn; the same batch on every rank
fsdp+tp    2-D ("dp", "tp"): N/tp x tp   TP inside each group of `tp` ranks, FSDP across the groups
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lmforge.errors import LmforgeError
from lmforge.options import from_mapping, option, to_mapping, validate

STRATEGIES = ("none", "ddp", "fsdp", "tp", "fsdp+tp")
FSDP_TP_DEFAULT_DEGREE = 2  # fsdp+tp with tp=0: pairs of ranks (the smallest split that still shards blocks)


@dataclass(frozen=True)
class ParallelConfig:
    """How the model and the batch are split over the processes torchrun started."""

    parallel: str = option("none", "none, ddp, fsdp (FSDP2), tp (tensor parallel) or fsdp+tp", choices=STRATEGIES)
    tp: int = option(
        0, "tensor-parallel degree (0: every process with tp, 2 with fsdp+tp); the FSDP degree is the rest"
    )
    sequence_parallel: bool = option(True, "with tp: shard the norms and the residual stream over the sequence")
    loss_parallel: bool = option(
        False, "with tp: keep the logits sharded over the vocabulary; the loss must run under loss_parallel()"
    )
    fsdp_cpu_offload: bool = option(False, "with fsdp: keep parameters, gradients and optimizer state in CPU memory")

    def __post_init__(self) -> None:
        validate(self)
        if self.tp < 0:
            raise LmforgeError(f"tp must be >= 0 (0: the default degree), got {self.tp}.")
        if self.tp > 1 and "tp" not in self.parallel:
            raise LmforgeError(
                f"tp {self.tp} is a tensor-parallel degree, but strategy {self.parallel!r} has no tensor "
                "parallelism; use strategy tp or fsdp+tp, or drop tp."
            )
        if self.loss_parallel and "tp" not in self.parallel:
            raise LmforgeError(
                f"loss_parallel shards the logits over tensor-parallel ranks, but strategy {self.parallel!r} has "
                "none; use strategy tp or fsdp+tp, or drop loss_parallel."
            )
        if self.fsdp_cpu_offload and "fsdp" not in self.parallel:
            raise LmforgeError(
                f"fsdp_cpu_offload needs FSDP, but strategy is {self.parallel!r}; use strategy fsdp or fsdp+tp."
            )

    def tp_degree(self, world_size: int) -> int:
        """The tensor-parallel degree at this world size (1 without tensor parallelism)."""
        if "tp" not in self.parallel:
            return 1
        if self.tp:
            return self.tp
        return world_size if self.parallel == "tp" else min(FSDP_TP_DEFAULT_DEGREE, world_size)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ParallelConfig:
        return from_mapping(cls, d)

    def to_dict(self) -> dict[str, Any]:
        return to_mapping(self)


def check_world(config: ParallelConfig, world_size: int) -> None:
    """Refuse a strategy that this many processes cannot run, naming the numbers."""
    if world_size < 1:
        raise LmforgeError(f"world size must be >= 1, got {world_size}.")
    if config.parallel == "none" and world_size > 1:
        raise LmforgeError(
            f"strategy none trains one copy per process, but {world_size} processes were started; "
            "choose ddp, fsdp, tp or fsdp+tp, or launch a single process."
        )
    degree = config.tp_degree(world_size)
    if config.parallel == "tp" and degree != world_size:
        raise LmforgeError(
            f"strategy tp spreads the model over every process, but tp {degree} != world size {world_size}; "
            f"set tp {world_size} (or 0), or use fsdp+tp to combine tensor parallelism with FSDP."
        )
    if config.parallel == "fsdp+tp" and world_size % degree:
        raise LmforgeError(
            f"fsdp+tp needs the world size divisible by the tp degree, but {world_size} processes do not split "
            f"into groups of {degree}; choose a tp that divides {world_size}."
        )


def build_mesh(config: ParallelConfig, world_size: int, device_type: str) -> DeviceMesh | None:
    """The DeviceMesh of `config` over `world_size` ranks on `device_type` ("cpu" or "cuda"), or None when
    there is nothing to split: strategy none, or a single process without a process group (DDP, FSDP or TP
    of one rank is the plain model). Dimension names are "dp" and "tp", so `mesh["dp"]` and `mesh["tp"]`
    are the sub-meshes the passes use. Needs the process group (lmforge.runtime.init_distributed).
    """
    check_world(config, world_size)
    if config.parallel == "none":
        return None
    if not (dist.is_available() and dist.is_initialized()):
        if world_size == 1:
            return None
        raise LmforgeError(
            f"strategy {config.parallel} over {world_size} processes needs the process group: launch with "
            "torchrun and call lmforge.runtime.init_distributed() first."
        )
    if dist.get_world_size() != world_size:
        raise LmforgeError(f"the process group has {dist.get_world_size()} ranks, not the {world_size} asked for.")
    if config.parallel in ("ddp", "fsdp"):
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("dp",))
    if config.parallel == "tp":
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("tp",))
    degree = config.tp_degree(world_size)
    # tp is the inner (fastest-varying) dimension: ranks 0..tp-1 form one TP group, on one machine under
    # torchrun's numbering, where the per-layer collectives get the fast links (torchtitan's layout).
    return init_device_mesh(device_type, (world_size // degree, degree), mesh_dim_names=("dp", "tp"))
