"""`lmforge finetune`: supervised fine-tuning (full or LoRA) on chat / instruction JSONL."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.finetune.runs import Start, checkpoint_writer, record_run, start_run
from lmforge.finetune.sft_data import SFTLoader, SFTReport, eval_batches, read_conversations, tokenize_conversations
from lmforge.plots import plot_training, read_metrics
from lmforge.train.config import TrainConfig
from lmforge.train.loop import TrainResult, train


@dataclass
class FinetuneOutput:
    result: TrainResult
    run_dir: Path
    start: Start
    data: SFTReport
    plot: Path | None


def split_examples(items: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded held-out share (at least one item when there are at least two and the share is > 0)."""
    if not 0 <= val_fraction < 1:
        raise LmforgeError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    n_val = 0 if val_fraction == 0 or len(items) < 2 else max(1, round(len(items) * val_fraction))
    order = np.random.default_rng(seed).permutation(len(items))
    val = set(order[:n_val].tolist())
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]


def finetune(
    model: str | Path,
    data: str | Path,
    run_dir: str | Path,
    cfg: TrainConfig,
    *,
    method: str = "full",
    lora: Any = None,
    val_fraction: float = 0.05,
    pack: bool = True,
    too_long: str = "truncate",
    resume: bool = False,
    progress: bool = True,
) -> FinetuneOutput:
    run_dir = Path(run_dir)
    start = start_run(model, run_dir, method, lora, resume)
    tok = start.tokenizer
    conversations = read_conversations(data)
    train_convs, val_convs = split_examples(conversations, val_fraction, cfg.seed)
    # A row holds seq_len + 1 tokens (inputs and shifted labels), so that is the longest example that fits.
    examples, report = tokenize_conversations(tok, train_convs, cfg.seq_len + 1, too_long)
    val_examples = tokenize_conversations(tok, val_convs, cfg.seq_len + 1, too_long)[0] if val_convs else []
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    loader = SFTLoader(examples, cfg.batch_size, cfg.seq_len, pad, seed=cfg.seed, pack=pack)
    record_run(
        run_dir,
        "sft",
        start,
        {
            "data": str(data),
            "method": method,
            "pack": pack,
            "too_long": too_long,
            "val_fraction": val_fraction,
            "train": cfg.to_dict(),
            "data_report": vars(report),
        },
    )
    val = (lambda: eval_batches(val_examples, cfg.batch_size, cfg.seq_len, pad)) if val_examples else None
    result = train(
        start.model,
        loader,
        cfg,
        run_dir,
        val_batches=val,
        tokenizer_dir=start.base_dir,
        resume_from=start.resume_from,
        progress=progress,
        save_model=checkpoint_writer(start),
    )
    plot = plot_training(read_metrics(run_dir / "metrics.jsonl"), run_dir / "loss.png", title=f"SFT ({method})")
    return FinetuneOutput(result, run_dir, start, report, plot)
