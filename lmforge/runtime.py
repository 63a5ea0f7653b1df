"""The one place that asks the machine: which precision is fast here, autocast on the right device, and
which process of a torchrun job this is (rank, world size, the process group's one init and teardown).

Machines differ more than their names suggest: on a CPU with AVX-512 BF16 a bf16 matmul runs ~4x faster
than fp32, on an AVX2-only CPU the same bf16 matmul falls back to a scalar path ~100x SLOWER than fp32
(REFERENCE.md section 5). So no precision is assumed: `--dtype auto` measures a small matmul in each
candidate dtype (a few milliseconds, once per process and device) and picks bf16 only where it is faster.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from lmforge.errors import LmforgeError

DTYPE_CHOICES = ("auto", "float32", "bfloat16")
DTYPE_HELP = "auto (measure which is faster on this machine), float32, or bfloat16"
# Training under bf16 autocast also pays for casts and for the ops autocast keeps in fp32, so bf16 must be
# clearly faster in a bare matmul to win a whole step (1.8x step speed was seen at a ~3.6x matmul ratio).
TRAIN_BF16_MIN_SPEEDUP = 1.5
# Inference keeps a checkpoint's half-precision weights unless their matmuls are much slower than fp32
# (decoding is memory-bound, where half the bytes often win even with somewhat slower arithmetic).
INFER_HALF_MIN_RATIO = 0.5

_PROBE_N = 256  # large enough for the vector units to reach their steady state, small enough to take ~1 ms
_PROBE_SECONDS = 0.002


@dataclass(frozen=True)
class Precision:
    """What the probe measured on one device (FLOP/s of an n x n matmul) and the dtype it chose."""

    device: str
    float32_flops: float
    bfloat16_flops: float
    choice: str  # "float32" or "bfloat16": the training dtype `auto` resolves to

    def describe(self) -> str:
        if self.device.startswith("cuda"):
            return f"{self.choice} on {self.device} ({'bf16 supported' if self.choice == 'bfloat16' else 'no bf16'})"
        return (
            f"{self.choice} (matmul probe on {self.device}: bf16 {self.bfloat16_flops / 1e9:.1f} vs fp32 "
            f"{self.float32_flops / 1e9:.1f} GFLOP/s)"
        )


def _matmul_rate(dtype: torch.dtype, device: torch.device, limit_s: float | None = None) -> float:
    """Best FLOP/s of a _PROBE_N^3 matmul over ~_PROBE_SECONDS; gives up after one call slower than limit_s."""
    n = _PROBE_N
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a[:8, :8] @ b[:8, :8]  # the library's one-time start-up (oneDNN: ~25 ms) is not the kernel's speed
    a @ b  # the first call of this shape also creates (or JIT-compiles) the kernel: several ms for oneDNN
    t0 = time.perf_counter()
    a @ b
    first = time.perf_counter() - t0
    if limit_s is not None and first > limit_s:
        return 2 * n**3 / first  # a slow path: one call is measurement enough
    best, reps, deadline = first, 0, time.perf_counter() + _PROBE_SECONDS
    while reps < 3 or (time.perf_counter() < deadline and reps < 50):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return 2 * n**3 / best


@functools.lru_cache(maxsize=8)
def _probe(device: str) -> Precision:
    dev = torch.device(device)
    if dev.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        return Precision(device, 0.0, 0.0, "bfloat16" if bf16 else "float32")
    if dev.type != "cpu":  # mps, xpu, ...: no probe; fp32 is always correct
        return Precision(device, 0.0, 0.0, "float32")
    fp32 = _matmul_rate(torch.float32, dev)
    # A bf16 call 20x slower than fp32's already decides the matter (AVX2: ~15 ms instead of ~0.2 ms).
    bf16 = _matmul_rate(torch.bfloat16, dev, limit_s=20 * 2 * _PROBE_N**3 / fp32)
    return Precision(device, fp32, bf16, "bfloat16" if bf16 >= TRAIN_BF16_MIN_SPEEDUP * fp32 else "float32")


def probe_precision(device: str | torch.device = "cpu") -> Precision:
    """The measured matmul speeds of `device` and the training dtype `auto` picks there (cached)."""
    return _probe(str(torch.device(device)))


def _check_name(name: str) -> None:
    if name not in DTYPE_CHOICES:
        raise LmforgeError(f"unknown dtype {name!r}; use one of {', '.join(DTYPE_CHOICES)}.")


def training_dtype(name: str, device: str | torch.device = "cpu") -> str:
    """The compute dtype of a training run: 'float32', or 'bfloat16' (autocast over fp32 master weights)."""
    _check_name(name)
    return probe_precision(device).choice if name == "auto" else name


def inference_dtype(name: str, stored: torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype to load weights in for decoding or scoring: `auto` keeps the stored dtype unless it is a
    half-precision one whose matmuls are slow on this device, where fp32 (an exact upcast) is used."""
    _check_name(name)
    if name != "auto":
        return torch.float32 if name == "float32" else torch.bfloat16
    if stored not in (torch.bfloat16, torch.float16):
        return stored
    p = probe_precision(device)
    if torch.device(device).type == "cuda":
        return stored if stored == torch.float16 or p.choice == "bfloat16" else torch.float32
    if torch.device(device).type != "cpu":
        return stored
    # fp16 on CPU is a slow path everywhere (REFERENCE.md section 5); bf16 only where the probe says so.
    if stored == torch.bfloat16 and p.bfloat16_flops >= INFER_HALF_MIN_RATIO * p.float32_flops:
        return stored
    return torch.float32


def autocast(dtype: str | torch.dtype | None, device: str | torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on the device the parameters live on; a no-op for fp32."""
    if isinstance(dtype, str):
        dtype = None if dtype == "float32" else torch.bfloat16
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's parameters are (cpu for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


# --- processes: torchrun exports RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT to every worker;
# a plain `python -m lmforge ...` has none of them and is a world of one.
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
