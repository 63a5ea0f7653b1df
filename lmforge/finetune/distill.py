"""`lmforge distill`: knowledge distillation (Hinton et al. 2015) from a teacher into a student.

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * cross-entropy

per token, on prepared token shards. The T^2 factor keeps the soft-target gradients on the same scale for
any temperature. Teacher and student must share the tokenizer: their logits are compared token by token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.checkpoint import load_pretrained
from lmforge.data.loader import PackedLoader, sequential_batches
from lmforge.data.shards import TokenShards, has_split
from lmforge.errors import LmforgeError
from lmforge.finetune.config import DistillConfig
from lmforge.model import Transformer
from lmforge.parallel.mesh import ParallelConfig
from lmforge.plots import plot_training, read_metrics
from lmforge.runtime import is_rank0, model_device
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoints import resolve_model_dir, resume_point
from lmforge.train.config import TrainConfig, check_context, resolve_precision
from lmforge.train.loop import TrainResult, train
from lmforge.train.objectives import IGNORE_INDEX, LossOutput, token_cross_entropy
from lmforge.train.pretrain import build_model


def distill_objective(teacher: Transformer, temperature: float, alpha: float):
    def objective(model: Transformer, batch: dict[str, torch.Tensor]) -> LossOutput:
        ids, labels = batch["input_ids"], batch["labels"]
        positions = batch.get("position_ids")
        student = model(ids, position_ids=positions)
        with torch.no_grad():
            target = teacher(ids, position_ids=positions).float()
        mask = (labels != IGNORE_INDEX).float()
        log_s = F.log_softmax(student.float() / temperature, dim=-1)
        log_t = F.log_softmax(target / temperature, dim=-1)
        kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # [B, T]
        kl_sum = (kl * mask).sum() * temperature**2
        ce_sum = token_cross_entropy(student, labels)
        loss = alpha * kl_sum + (1 - alpha) * ce_sum
        return LossOutput(loss, mask.sum(), {"kl": kl_sum.detach(), "ce": ce_sum.detach()})

    return objective


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    return a.vocab_size == b.vocab_size and a.get_vocab() == b.get_vocab()


@dataclass
class DistillOutput:
    result: TrainResult
    run_dir: Path
    student: Transformer
    plot: Path | None


def distill(
    teacher: str | Path,
    student: str,
    data: str | Path,
    run_dir: str | Path,
    cfg: TrainConfig,
    options: DistillConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    parallel: ParallelConfig | None = None,
) -> DistillOutput:
    """Train `student` (a checkpoint, preset or config file) on `teacher`'s distribution over prepared shards."""
    options = options or DistillConfig()
    run_dir, data = Path(run_dir), Path(data)
    teacher_dir = resolve_model_dir(teacher)
    if not (teacher_dir / "tokenizer.json").is_file():
        raise LmforgeError(f"the teacher {teacher_dir} has no tokenizer.json; distillation needs the shared tokenizer.")
    tok = Tokenizer.from_pretrained(teacher_dir)
    teacher_model = load_pretrained(teacher_dir).eval().requires_grad_(False)
    shards = TokenShards(data, "train")
    if shards.vocab_size > teacher_model.config.vocab_size:
        raise LmforgeError(
            f"the data uses {shards.vocab_size} token ids but the teacher only knows "
            f"{teacher_model.config.vocab_size}; prepare the data with the teacher's tokenizer."
        )

    ckpt = resume_point(run_dir, resume, overwrite, sources=(teacher, student, data))
    student_dir = resolve_model_dir(student)
    if ckpt is not None:
        model = load_pretrained(ckpt, dtype=torch.float32)
    elif student_dir.is_dir():
        if (student_dir / "tokenizer.json").is_file() and not same_tokenizer(
            tok, Tokenizer.from_pretrained(student_dir)
        ):
            raise LmforgeError(
                f"the student {student_dir} and the teacher {teacher_dir} use different tokenizers; "
                "distillation compares their distributions token by token, so they must share one."
            )
        model = load_pretrained(student_dir, dtype=torch.float32)
    else:
        model = build_model(student, shards, teacher_dir, cfg.seed)
    if model.config.vocab_size != teacher_model.config.vocab_size:
        raise LmforgeError(
            f"the student's vocabulary ({model.config.vocab_size}) differs from the teacher's "
            f"({teacher_model.config.vocab_size}); they must share a tokenizer."
        )

    check_context(model, cfg)
    cfg = resolve_precision(cfg, model_device(model), announce=progress)
    objective = distill_objective(teacher_model, options.temperature, options.alpha)
    loader = PackedLoader(shards, cfg.batch_size, cfg.seq_len, seed=cfg.seed, mask_documents=cfg.mask_documents)
    val = TokenShards(data, "val") if has_split(data, "val") else None
    val_batches = (
        (lambda: sequential_batches(val, cfg.batch_size, cfg.seq_len)) if val and val.num_tokens > cfg.seq_len else None
    )
    result = train(
        model,
        loader,
        cfg,
        run_dir,
        objective=objective,
        val_batches=val_batches,
        tokenizer_dir=teacher_dir,
        resume_from=ckpt,
        progress=progress,
        parallel=parallel,
    )
    plot = (
        plot_training(read_metrics(run_dir / "metrics.jsonl"), run_dir / "loss.png", title="distillation")
        if is_rank0()
        else None
    )
    return DistillOutput(result, run_dir, model, plot)
