"""What every fine-tuning run shares: the model to start from (full weights or LoRA adapters on a frozen
base), resuming, what a checkpoint holds, and the run's record of its settings."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.checkpoint import load_pretrained, save_pretrained
from lmforge.errors import LmforgeError
from lmforge.finetune.config import METHODS
from lmforge.model import Transformer
from lmforge.runtime import is_rank0
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoints import resolve_model_dir, resume_point


@dataclass
class Start:
    model: Transformer
    tokenizer: Tokenizer
    base_dir: Path  # the checkpoint the run started from (the frozen base of a LoRA run)
    resume_from: Path | None
    lora: Any | None  # lmforge.finetune.lora.LoraConfig when training adapters
    report: Any | None = None  # lmforge.finetune.lora.LoraReport


def start_run(
    model: str | Path,
    run_dir: Path,
    method: str,
    lora: Any | None,
    resume: bool,
    seed: int = 0,
    overwrite: bool = False,
) -> Start:
    """Load the starting model for a fine-tuning run (or the state to resume), in fp32 for training. A LoRA
    run's adapters are initialised from `seed` (default LoraConfig() when none is given)."""
    if method not in METHODS:
        raise LmforgeError(f"--method must be one of {', '.join(METHODS)}, got {method!r}.")
    if method == "lora" and lora is None:
        from lmforge.finetune.lora import LoraConfig

        lora = LoraConfig()
    if method == "full":
        lora = None
    ckpt = resume_point(run_dir, resume, overwrite, sources=(model,))
    base_dir = resolve_model_dir(model)
    if not (base_dir / "tokenizer.json").is_file():
        raise LmforgeError(f"{base_dir} has no tokenizer.json; fine-tuning renders text with the model's tokenizer.")
    tokenizer = Tokenizer.from_pretrained(base_dir)
    if method == "full":
        return Start(load_pretrained(ckpt or base_dir, dtype=torch.float32), tokenizer, base_dir, ckpt, None)
    from lmforge.finetune.lora import apply_lora, load_adapter

    model_ = load_pretrained(base_dir, dtype=torch.float32)
    if ckpt is not None:
        load_adapter(model_, ckpt)
        for name, p in model_.named_parameters():
            p.requires_grad_("lora_" in name)
        return Start(model_, tokenizer, base_dir, ckpt, lora)
    report = apply_lora(model_, lora, generator=torch.Generator().manual_seed(seed))
    return Start(model_, tokenizer, base_dir, None, lora, report)


def checkpoint_writer(start: Start):
    """How checkpoints store weights: the whole model, or only the adapters (PEFT format) for LoRA."""
    if start.lora is None:
        return save_pretrained
    from lmforge.finetune.lora import save_adapter

    def save(model: Transformer, path: Path) -> None:
        save_adapter(model, start.lora, path, base_model_name_or_path=str(start.base_dir))

    return save


def record_run(run_dir: Path, kind: str, start: Start, settings: dict[str, Any]) -> None:
    if not is_rank0():  # under torchrun, rank 0 alone writes
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "kind": kind,
        "base_model": str(start.base_dir),
        "lora": asdict(start.lora) if start.lora is not None else None,
        **settings,
    }
    (run_dir / "run.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
