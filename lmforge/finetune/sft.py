"""`lmforge finetune`: supervised fine-tuning (full or LoRA) on chat / instruction JSONL."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmforge.data.split import split_indices
from lmforge.finetune.config import SFTConfig
from lmforge.finetune.lora import LoraConfig
from lmforge.finetune.runs import Start, checkpoint_writer, record_run, start_run
from lmforge.finetune.sft_data import SFTLoader, SFTReport, eval_batches, read_conversations, tokenize_conversations
from lmforge.options import to_mapping
from lmforge.parallel.mesh import ParallelConfig
from lmforge.plots import plot_training, read_metrics
from lmforge.runtime import is_rank0, model_device
from lmforge.train.config import TrainConfig, check_context, resolve_precision
from lmforge.train.loop import TrainResult, train


@dataclass
class FinetuneOutput:
    result: TrainResult
    run_dir: Path
    start: Start
    data: SFTReport
    plot: Path | None


def split_examples(items: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """(training items, held-out items): the seeded split `lmforge prepare` uses for documents."""
    train_idx, val_idx = split_indices(len(items), val_fraction, seed)
    return [items[i] for i in train_idx], [items[i] for i in val_idx]


def finetune(
    model: str | Path,
    data: str | Path,
    run_dir: str | Path,
    cfg: TrainConfig,
    sft: SFTConfig | None = None,
    lora: LoraConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    parallel: ParallelConfig | None = None,
) -> FinetuneOutput:
    """Supervised fine-tuning of `model` (a checkpoint or run directory) on chat/instruction JSONL `data`."""
    sft = sft or SFTConfig()
    run_dir = Path(run_dir)
    start = start_run(model, run_dir, sft.method, lora, resume, cfg.seed, overwrite)
    check_context(start.model, cfg)
    cfg = resolve_precision(cfg, model_device(start.model), announce=progress)
    tok = start.tokenizer
    conversations = read_conversations(data)
    train_convs, val_convs = split_examples(conversations, sft.val_fraction, cfg.seed)
    # A row holds seq_len + 1 tokens (inputs and shifted labels), so that is the longest example that fits.
    examples, report = tokenize_conversations(tok, train_convs, cfg.seq_len + 1, sft.too_long)
    val_examples = tokenize_conversations(tok, val_convs, cfg.seq_len + 1, sft.too_long)[0] if val_convs else []
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    loader = SFTLoader(examples, cfg.batch_size, cfg.seq_len, pad, seed=cfg.seed, pack=sft.pack)
    record_run(
        run_dir,
        "sft",
        start,
        {"data": str(data), "sft": to_mapping(sft), "train": cfg.to_dict(), "data_report": vars(report)},
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
        parallel=parallel,
    )
    plot = None
    if is_rank0():
        plot = plot_training(read_metrics(run_dir / "metrics.jsonl"), run_dir / "loss.png", title=f"SFT ({sft.method})")
    return FinetuneOutput(result, run_dir, start, report, plot)
