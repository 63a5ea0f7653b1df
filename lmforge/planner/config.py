"""PlanConfig: what `lmforge plan` is asked about (the job's shape), declared once and validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.errors import LmforgeError
from lmforge.options import option, to_mapping, validate
from lmforge.train.optim import OPTIMIZERS

STRATEGIES = ("ddp", "fsdp", "tp", "fsdp+tp")
COMPUTE_DTYPES = ("float32", "bfloat16")
KERNELS = ("cuda", "cpu")
FSDP_TP_DEFAULT_DEGREE = 2  # lmforge.parallel.mesh's: pairs of ranks, the smallest split that still shards blocks
H100_BF16_FLOPS = 989e12  # H100 SXM, dense bf16 tensor cores (NVIDIA's datasheet; 1979e12 is with sparsity)


@dataclass(frozen=True)
class PlanConfig:
    """A training job to size: devices, parallelism, batch shape, precision, optimizer and assumed speed."""

    gpus: int = option(1, "devices in the job")
    strategy: str = option(
        "ddp",
        "ddp (replicate everything), fsdp (shard weights, gradients and optimizer state over the data-parallel "
        "ranks), tp (tensor parallelism over every device), fsdp+tp (TP groups of --tp, FSDP across them)",
        choices=STRATEGIES,
    )
    tp: int | None = option(
        None, "tensor-parallel degree (default: all of --gpus with tp, 2 with fsdp+tp, as lmforge.parallel)"
    )
    seq_len: int = option(2048, "tokens per sequence")
    batch_size: int = option(1, "sequences per micro-batch on each data-parallel rank")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    sequence_parallel: bool = option(
        True, "with tp: shard the norms and the residual stream over the sequence (lmforge.parallel's default)"
    )
    loss_parallel: bool = option(False, "with tp: keep the logits sharded over the vocabulary for the loss")
    activation_checkpointing: bool = option(False, "recompute each block's activations in the backward pass")
    dtype: str = option(
        "bfloat16",
        "compute precision: bfloat16 (autocast, or FSDP's bf16-gathered weights) or float32; stored weights stay fp32",
        choices=COMPUTE_DTYPES,
    )
    fsdp_mixed_precision: bool = option(
        True,
        "with fsdp and bfloat16: FSDP all-gathers bf16 parameters (MixedPrecisionPolicy, as lmforge.parallel "
        "does) instead of autocasting fp32 ones",
    )
    optimizer: str = option(
        "adamw", "adamw, or muon (Muon for the hidden matrices, AdamW for the rest)", choices=OPTIMIZERS
    )
    mfu: float = option(0.4, "model FLOPs utilisation assumed for the step time")
    gpu_flops: float = option(
        H100_BF16_FLOPS, "peak FLOP/s of one device in the compute dtype; an H100 SXM's dense bf16 is 989e12"
    )
    kernels: str = option(
        "cuda",
        "whose kernels the activation formulas follow: cuda (flash / efficient attention, SDPA in bf16 under "
        "autocast) or cpu (lmforge's CPU path, attention in fp32; what tests/test_plan.py measures)",
        choices=KERNELS,
    )

    def __post_init__(self) -> None:
        validate(self)
        for name in ("gpus", "seq_len", "batch_size", "grad_accum"):
            if getattr(self, name) <= 0:
                raise LmforgeError(f"{name} must be positive, got {getattr(self, name)}.")
        if not 0 < self.mfu <= 1:
            raise LmforgeError(f"mfu must be in (0, 1], got {self.mfu}; 0.3-0.5 is typical for dense LLM training.")
        if not self.gpu_flops > 0:
            raise LmforgeError(f"gpu_flops must be positive, got {self.gpu_flops:g}.")
        tp = self.tp
        if tp is not None and tp <= 0:
            raise LmforgeError(f"tp must be positive, got {tp}.")
        if self.strategy in ("ddp", "fsdp") and tp not in (None, 1):
            raise LmforgeError(
                f"--tp {tp} applies to --strategy tp or fsdp+tp, not {self.strategy}; drop --tp or change the strategy."
            )
        if self.strategy == "tp" and tp is not None and tp != self.gpus:
            raise LmforgeError(
                f"--strategy tp puts all {self.gpus} GPUs in one tensor-parallel group, so --tp must be {self.gpus}, "
                f"got {tp}; use --strategy fsdp+tp --tp {tp} for data parallelism across TP groups."
            )
        if self.strategy == "fsdp+tp" and self.gpus % self.tp_degree:
            raise LmforgeError(
                f"--gpus {self.gpus} is not divisible by --tp {self.tp_degree}: fsdp+tp needs whole TP groups of "
                f"{self.tp_degree} GPUs."
            )
        if self.loss_parallel and self.tp_degree == 1:
            raise LmforgeError(
                "loss_parallel keeps the logits sharded over tensor-parallel ranks, but this plan has none; "
                "use --strategy tp or fsdp+tp with --tp > 1, or drop --loss-parallel."
            )

    @property
    def tp_degree(self) -> int:
        """Devices one tensor-parallel group spans (1 without TP)."""
        if self.strategy == "tp":
            return self.gpus
        if self.strategy == "fsdp+tp":
            return self.tp or min(FSDP_TP_DEFAULT_DEGREE, self.gpus)
        return 1

    @property
    def dp_degree(self) -> int:
        """Data-parallel ranks (replicas for DDP, shards for FSDP)."""
        return self.gpus // self.tp_degree

    @property
    def shards_state(self) -> bool:
        """Whether weights, gradients and optimizer state are sharded over the data-parallel ranks (FSDP)."""
        return self.strategy in ("fsdp", "fsdp+tp")

    @property
    def bf16_params(self) -> bool:
        """Whether the forward reads bf16 parameters (FSDP's mixed precision) rather than autocasting fp32 ones."""
        return self.shards_state and self.dtype == "bfloat16" and self.fsdp_mixed_precision

    def to_dict(self) -> dict:
        return to_mapping(self)
