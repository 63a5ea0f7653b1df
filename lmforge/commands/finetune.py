"""`lmforge finetune` (SFT, full or LoRA; --merge), `lmforge dpo` and `lmforge distill`."""

from __future__ import annotations

import argparse
from typing import Any

from lmforge.cli import command
from lmforge.commands.flags import Options, add_options
from lmforge.commands.train import (
    add_parallel_options,
    add_resume_args,
    add_run_args,
    distributed_run,
    start_distributed,
    training_summary,
)
from lmforge.errors import LmforgeError
from lmforge.finetune.config import DistillConfig, DPOConfig, SFTConfig
from lmforge.finetune.lora import LoraConfig
from lmforge.runtime import is_rank0
from lmforge.train.config import TrainConfig

_MODEL_HELP = "checkpoint directory (or run directory) to start from"


def _lora_line(start: Any) -> str:
    if start.report is None:
        return ""
    rep = start.report
    return (
        f"\nLoRA: {rep.trainable:,} trainable of {rep.total:,} parameters ({rep.trainable_percent:.2f}%), "
        f"~{rep.memory_saved_bytes / 1e6:.1f} MB of gradients and optimizer state saved vs full fine-tuning"
    )


def _lora(o: Options, method: str) -> LoraConfig | None:
    """The LoRA options of a `--method lora` run; given for a full run, they are refused, not ignored."""
    lora = o.build(LoraConfig, prefix="lora_")
    if method == "lora":
        return lora
    named = o.given_keys(LoraConfig, prefix="lora_")
    if named:
        flags = ", ".join("--" + k.replace("_", "-") for k in sorted(named))
        raise LmforgeError(f"{flags} only apply to --method lora; add --method lora or drop them.")
    return None


def _add_finetune_options(p: argparse.ArgumentParser, cls: type) -> None:
    add_options(p, cls, title=f"{cls.__name__} options")
    add_options(p, LoraConfig, prefix="lora_", title="LoRA options (with --method lora)")
    add_options(p, TrainConfig, title="training options")
    add_parallel_options(p)


# --- finetune --------------------------------------------------------------------------------------
def _finetune_args(p: argparse.ArgumentParser) -> None:
    add_run_args(
        p, _MODEL_HELP, "chat JSONL ({'messages': [...]}) or instruction JSONL ({'instruction', 'input', 'output'})"
    )
    p.add_argument("--merge", action="store_true", help="fold --adapter into --model and write --out")
    p.add_argument("--adapter", help="with --merge: a LoRA adapter directory (PEFT format)")
    _add_finetune_options(p, SFTConfig)


@command(
    "finetune", "supervised fine-tuning on chat/instruction data (full or LoRA); --merge folds adapters", _finetune_args
)
def run_finetune(args: argparse.Namespace) -> int:
    if args.merge:
        return _merge(args)
    from lmforge.finetune.sft import finetune

    o = Options(args, args.config)
    model, data, out_dir = o.require("model", "data", "out")
    sft, cfg = o.build(SFTConfig), o.build(TrainConfig)
    lora = _lora(o, sft.method)
    resume, overwrite = bool(o.value("resume")), bool(o.value("overwrite"))
    parallel = start_distributed(o)
    o.check_file_used()
    with distributed_run():
        out = finetune(model, data, out_dir, cfg, sft, lora, resume=resume, overwrite=overwrite, parallel=parallel)
    if is_rank0():
        print(f"data: {out.data.format()}" + _lora_line(out.start))
        print(training_summary(out.result, out.run_dir, out.plot))
    return 0


def _merge(args: argparse.Namespace) -> int:
    from lmforge.checkpoint import companion_files, load_pretrained, save_pretrained
    from lmforge.finetune.lora import load_adapter, merge_lora
    from lmforge.train.checkpoints import resolve_model_dir

    if not (args.model and args.adapter and args.out):
        raise LmforgeError("--merge needs --model (the base), --adapter and --out.")
    base = resolve_model_dir(args.model)
    model = load_pretrained(base)
    load_adapter(model, resolve_model_dir(args.adapter))
    merge_lora(model)
    out = save_pretrained(model, args.out, extra_files=companion_files(base))
    print(f"merged {args.adapter} into {base}; wrote {out} (HF format)")
    return 0


# --- dpo -------------------------------------------------------------------------------------------
def _dpo_args(p: argparse.ArgumentParser) -> None:
    add_run_args(p, _MODEL_HELP, "preference JSONL ({'prompt', 'chosen', 'rejected'})")
    _add_finetune_options(p, DPOConfig)


@command("dpo", "preference optimisation (DPO or IPO) against the frozen starting model", _dpo_args)
def run_dpo(args: argparse.Namespace) -> int:
    from lmforge.finetune.dpo import dpo

    o = Options(args, args.config)
    model, data, out_dir = o.require("model", "data", "out")
    options, cfg = o.build(DPOConfig), o.build(TrainConfig)
    lora = _lora(o, options.method)
    resume, overwrite = bool(o.value("resume")), bool(o.value("overwrite"))
    parallel = start_distributed(o)
    o.check_file_used()
    with distributed_run():
        out = dpo(model, data, out_dir, cfg, options, lora, resume=resume, overwrite=overwrite, parallel=parallel)
    if not is_rank0():
        return 0
    last = next((h for h in reversed(out.result.history) if "preference_accuracy" in h), {})
    extra = (
        f"; last step: reward margin {last.get('reward_margin', 0):.3f}, "
        f"preference accuracy {last.get('preference_accuracy', 0):.2f}"
        if last
        else ""
    )
    print(f"pairs: {out.counts}" + _lora_line(out.start))
    print(training_summary(out.result, out.run_dir, out.plot, extra))
    return 0


# --- distill ---------------------------------------------------------------------------------------
def _distill_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", help="teacher checkpoint directory (its tokenizer is shared)")
    p.add_argument("--student", help="student checkpoint directory, preset or config file (random init)")
    p.add_argument("--data", help="directory written by `lmforge prepare` with the teacher's tokenizer")
    p.add_argument("--out", help="run directory (run.json, metrics.jsonl, loss.png, checkpoints/)")
    add_resume_args(p)
    add_options(p, DistillConfig, title="distillation options")
    add_options(p, TrainConfig, title="training options")
    add_parallel_options(p)


@command("distill", "train a student on a teacher's distribution (KL) mixed with cross-entropy", _distill_args)
def run_distill(args: argparse.Namespace) -> int:
    from lmforge.finetune.distill import distill

    o = Options(args, args.config)
    teacher, student, data, out_dir = o.require("teacher", "student", "data", "out")
    options, cfg = o.build(DistillConfig), o.build(TrainConfig)
    resume, overwrite = bool(o.value("resume")), bool(o.value("overwrite"))
    parallel = start_distributed(o)
    o.check_file_used()
    with distributed_run():
        out = distill(
            teacher, student, data, out_dir, cfg, options, resume=resume, overwrite=overwrite, parallel=parallel
        )
    if is_rank0():
        print(training_summary(out.result, out.run_dir, out.plot))
    return 0
