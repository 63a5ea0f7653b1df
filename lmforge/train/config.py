"""TrainConfig: every knob of the training loop, validated on construction, loadable from a file."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError, suggest
from lmforge.runtime import DTYPE_CHOICES
from lmforge.train.optim import SCHEDULES

OBJECTIVES = ("causal", "glm")  # pretraining objectives: next-token prediction, GLM blank infilling
GLM_VARIANTS = ("token", "sentence", "document", "mixed")  # lmforge.train.glm explains each


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | wsd | linear | constant
    decay_fraction: float = 0.2  # wsd: share of the run spent decaying
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still logged)
    dtype: str = "auto"  # auto (measured, lmforge.runtime), float32, or bfloat16 autocast over fp32 weights
    compile: bool = False
    activation_checkpointing: bool = False
    seed: int = 0
    mask_documents: bool = False  # block-diagonal attention inside packed sequences
    objective: str = "causal"  # pretraining: causal (next token) | glm (blank infilling, docs/glm.md)
    glm_variant: str = "token"  # glm: token | sentence | document | mixed
    eval_every: int = 200
    eval_batches: int = 20  # 0: the whole validation split
    save_every: int = 500
    keep_last: int = 2
    log_every: int = 10
    max_minutes: float | None = None  # wall-clock budget; the schedule then follows elapsed time
    max_bad_steps: int = 5  # consecutive non-finite steps before giving up

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "max_bad_steps")
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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            hints = "".join(suggest(k, known) for k in unknown)
            raise LmforgeError(f"unknown training options {unknown}.{hints}")
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | Path) -> dict[str, Any]:
        """The options in a JSON or TOML file (keys as in TrainConfig, plus model/data/out for the CLI)."""
        path = Path(path)
        if not path.is_file():
            raise LmforgeError(f"config file {path} does not exist.")
        text = path.read_text()
        try:
            if path.suffix == ".toml":
                import tomllib

                return tomllib.loads(text)
            return json.loads(text)
        except Exception as e:
            raise LmforgeError(f"cannot parse {path} ({e}); write it as JSON or TOML.") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
