"""The options of the fine-tuning commands, declared once (lmforge/options.py): what every fine-tuning run
shares, and what SFT, DPO and distillation add. LoRA's are `lmforge.finetune.lora.LoraConfig`."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.errors import LmforgeError
from lmforge.options import option, validate

METHODS = ("full", "lora")
TOO_LONG = ("truncate", "skip")
DPO_LOSSES = ("sigmoid", "ipo")


@dataclass(frozen=True)
class FinetuneConfig:
    method: str = option("full", "train all weights (full) or LoRA adapters on a frozen base (lora)", choices=METHODS)
    val_fraction: float = option(0.05, "held-out share of the examples (0: none)")
    too_long: str = option("truncate", "examples longer than --seq-len: cut them or leave them out", choices=TOO_LONG)

    def __post_init__(self) -> None:
        validate(self)
        if not 0 <= self.val_fraction < 1:
            raise LmforgeError(f"val_fraction must be in [0, 1), got {self.val_fraction}.")


@dataclass(frozen=True)
class SFTConfig(FinetuneConfig):
    pack: bool = option(True, "pack short examples into one row (attention stays within each example)")


@dataclass(frozen=True)
class DPOConfig(FinetuneConfig):
    beta: float = option(0.1, "strength of the pull towards the frozen reference model")
    loss: str = option("sigmoid", "sigmoid (DPO) or ipo", choices=DPO_LOSSES)
    chat: bool | None = option(
        None, "render prompts and responses as chat turns (default: if the tokenizer has a format)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta > 0:
            raise LmforgeError(f"beta must be positive, got {self.beta}.")


@dataclass(frozen=True)
class DistillConfig:
    temperature: float = option(2.0, "softmax temperature of the teacher's and student's distributions")
    alpha: float = option(0.5, "weight of the KL term; 1 - alpha weighs the cross-entropy")

    def __post_init__(self) -> None:
        validate(self)
        if not self.temperature > 0 or not 0 <= self.alpha <= 1:
            raise LmforgeError(f"temperature must be > 0 and alpha in [0, 1], got {self.temperature} and {self.alpha}.")
