"""TrainConfig: every knob of the training loop, declared once (lmforge/options.py), validated on construction;
and the two checks of a config against the model (its context) and the machine (its precision)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lmforge.errors import LmforgeError, suggest, warn
from lmforge.options import from_mapping, option, to_mapping, validate
from lmforge.parallel.checkpointing import MODES as CHECKPOINT_MODES
from lmforge.runtime import DTYPE_CHOICES, DTYPE_HELP, probe_precision, training_dtype
from lmforge.train.optim import OPTIMIZERS, SCHEDULES

if TYPE_CHECKING:
    from lmforge.model import Transformer

OBJECTIVES = ("causal", "glm")  # pretraining objectives: next-token prediction, GLM blank infilling
GLM_VARIANTS = ("token", "sentence", "document", "mixed")  # lmforge.train.glm explains each


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run (pretraining and every fine-tuning objective share it)."""

    steps: int = option(1000, "optimizer steps")
    batch_size: int = option(16, "sequences per micro-batch")
    seq_len: int = option(256, "tokens per sequence")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: float = option(3e-4, "peak learning rate")
    min_lr_ratio: float = option(0.1, "final learning rate as a share of the peak")
    warmup_steps: int = option(100, "steps of linear warmup")
    schedule: str = option("cosine", "learning-rate schedule after warmup", choices=SCHEDULES)
    decay_fraction: float = option(0.2, "wsd: share of the run spent decaying")
    weight_decay: float = option(0.1, "AdamW weight decay on matrices (never on norms or biases)")
    decay_embeddings: bool = option(False, "also decay the embedding matrix")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    eps: float = option(1e-8, "AdamW epsilon")
    grad_clip: float = option(1.0, "clip the gradient norm to this (0: no clipping; the norm is still logged)")
    dtype: str = option(
        "auto", "compute precision: " + DTYPE_HELP + " (autocast; weights stay fp32)", choices=DTYPE_CHOICES
    )
    compile: bool = option(False, "torch.compile the model")
    activation_checkpointing: str = option(
        "none",
        "recompute activations in the backward pass to save memory: none, full (every block) or selective "
        "(every --checkpoint-every-th block)",
        choices=CHECKPOINT_MODES,
    )
    checkpoint_every: int = option(2, "with selective checkpointing: recompute every k-th block (1 is full)")
    seed: int = option(0, "seed of initialisation, data order and dropout")
    mask_documents: bool = option(False, "block-diagonal attention within packed documents")
    objective: str = option(
        "causal", "causal (next token) or glm (GLM blank infilling, docs/glm.md)", choices=OBJECTIVES
    )
    glm_variant: str = option("token", "with --objective glm: the kind of spans blanked", choices=GLM_VARIANTS)
    eval_every: int = option(200, "evaluate on the validation split every N steps (0: only at the end)")
    eval_batches: int = option(20, "validation batches per evaluation (0: the whole split)")
    save_every: int = option(500, "save a checkpoint every N steps (0: only at the end)")
    keep_last: int = option(2, "checkpoints to keep (0: all)")
    max_minutes: float | None = option(None, "stop after this many minutes; the schedule then follows the clock")
    max_bad_steps: int = option(5, "consecutive non-finite steps before giving up")
    optimizer: str = option(
        "adamw", "adamw, or muon: Muon for the hidden matrices, AdamW for the rest", choices=OPTIMIZERS
    )  # lmforge.train.muon
    muon_momentum: float = option(0.95, "with --optimizer muon: momentum of the hidden matrices' updates")

    def __post_init__(self) -> None:
        validate(self)
        positive = ("steps", "batch_size", "seq_len", "grad_accum", "max_bad_steps", "checkpoint_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise LmforgeError(f"{name} must be positive, got {getattr(self, name)}.")
        for name in ("warmup_steps", "eval_every", "eval_batches", "save_every", "keep_last", "weight_decay"):
            if getattr(self, name) < 0:
                raise LmforgeError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if not self.lr > 0:
            raise LmforgeError(f"lr must be positive, got {self.lr}.")
        if not 0 <= self.min_lr_ratio <= 1:
            raise LmforgeError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}.")
        if not 0 < self.decay_fraction <= 1:
            raise LmforgeError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}.")
        if self.schedule not in SCHEDULES:
            raise LmforgeError(
                f"unknown schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}."
                + suggest(self.schedule, SCHEDULES)
            )
        if self.dtype not in DTYPE_CHOICES:
            raise LmforgeError(f"training dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}.")
        if self.objective not in OBJECTIVES:
            raise LmforgeError(
                f"unknown objective {self.objective!r}; use one of {', '.join(OBJECTIVES)}."
                + suggest(self.objective, OBJECTIVES)
            )
        if self.glm_variant not in GLM_VARIANTS:
            raise LmforgeError(
                f"unknown glm_variant {self.glm_variant!r}; use one of {', '.join(GLM_VARIANTS)}."
                + suggest(self.glm_variant, GLM_VARIANTS)
            )
        if self.objective == "glm" and self.mask_documents:
            raise LmforgeError(
                "mask_documents applies to the causal objective (packed windows); GLM samples never mix "
                "documents: drop --mask-documents."
            )
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise LmforgeError(f"max_minutes must be positive, got {self.max_minutes}.")
        if self.optimizer not in OPTIMIZERS:
            raise LmforgeError(
                f"unknown optimizer {self.optimizer!r}; use one of {', '.join(OPTIMIZERS)}."
                + suggest(self.optimizer, OPTIMIZERS)
            )
        if not 0 <= self.muon_momentum < 1:
            raise LmforgeError(f"muon_momentum must be in [0, 1), got {self.muon_momentum}; 0.95 is the usual value.")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """From option names to values (e.g. a config file or a checkpoint's record), each type checked."""
        return from_mapping(cls, d)

    def to_dict(self) -> dict[str, Any]:
        return to_mapping(self)


def check_context(model: Transformer, cfg: TrainConfig) -> None:
    """Training windows longer than the model's context would teach positions it never uses: refuse them."""
    limit = model.config.max_position_embeddings
    if cfg.seq_len > limit:
        raise LmforgeError(
            f"seq_len {cfg.seq_len} exceeds the model's context of {limit} tokens (max_position_embeddings); "
            f"lower --seq-len or use a model with a longer context."
        )


def resolve_precision(cfg: TrainConfig, device: str | torch.device = "cpu", announce: bool = False) -> TrainConfig:
    """`cfg` with dtype "auto" replaced by what the precision probe chose on `device` (float32/bfloat16);
    `announce` prints the choice. An explicit bf16 that is slower than fp32 here is kept, with a warning."""
    probe = probe_precision(device)
    if cfg.dtype == "auto":
        cfg = dataclasses.replace(cfg, dtype=training_dtype("auto", device))
        if announce:
            print(f"precision: {probe.describe()}", flush=True)
    elif cfg.dtype == "bfloat16" and 0 < probe.bfloat16_flops < probe.float32_flops:
        warn(
            f"bfloat16 was asked for, but bf16 matmuls run {probe.float32_flops / probe.bfloat16_flops:.0f}x slower "
            "than float32 on this machine; --dtype auto would train in float32."
        )
    return cfg
