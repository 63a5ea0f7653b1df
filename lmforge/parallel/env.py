"""The process group: rank and world size from torchrun's environment, and the one init/teardown.

torchrun (torch.distributed.run) exports RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT to
every worker; a plain `python -m lmforge ...` has none of them and is a world of one. These functions are
meant to join lmforge/runtime.py (the one place that asks the machine) when the lead merges them.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from lmforge.errors import LmforgeError


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise LmforgeError(f"environment variable {name}={value!r} must be an integer (torchrun sets it).") from None


def world_size() -> int:
    """Processes in the job: the live group's size, else WORLD_SIZE from torchrun, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def rank() -> int:
    """This process's global rank (0 in a single-process run)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def local_rank() -> int:
    """This process's rank on its machine: which GPU it drives."""
    return _env_int("LOCAL_RANK", 0)


def is_distributed() -> bool:
    """True when launched by torchrun with more than one process."""
    return world_size() > 1


def is_rank0() -> bool:
    """Only rank 0 logs and writes exports (DESIGN.md principle 7)."""
    return rank() == 0


def device_type() -> str:
    """'cuda' when a GPU is visible, else 'cpu': the device every rank computes on."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def backend_for(device: str) -> str:
    """nccl on CUDA, gloo on CPU (the only backend with CPU collectives in every build)."""
    return "nccl" if device == "cuda" else "gloo"


def init_distributed(timeout_s: float = 600.0) -> torch.device:
    """Join the process group torchrun set up (once; a second call is a no-op) and return this rank's device.

    A single process (no WORLD_SIZE, or WORLD_SIZE=1) joins nothing and gets cuda:0 or cpu. Under CUDA each
    rank takes GPU LOCAL_RANK before the group exists, so that nccl binds to the right device."""
    device = device_type()
    if device == "cuda":
        if local_rank() >= torch.cuda.device_count():
            raise LmforgeError(
                f"LOCAL_RANK {local_rank()} has no GPU: this machine shows {torch.cuda.device_count()}; "
                "lower --nproc-per-node to the number of GPUs."
            )
        torch.cuda.set_device(local_rank())
    here = torch.device(device, local_rank()) if device == "cuda" else torch.device("cpu")
    if not is_distributed() or dist.is_initialized():
        return here
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise LmforgeError(f"WORLD_SIZE is set but {name} is not; launch with torchrun, which sets both.")
    kwargs = {"device_id": here} if device == "cuda" else {}
    dist.init_process_group(backend_for(device), timeout=timedelta(seconds=timeout_s), **kwargs)
    return here


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    """Leave the process group (a no-op when none was joined); call once at the end of the run."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
