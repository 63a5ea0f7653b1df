"""`lmforge pretrain` and `lmforge quickstart`."""

from __future__ import annotations

import argparse
import contextlib

from lmforge.cli import command
from lmforge.commands.flags import Options, add_options
from lmforge.runtime import is_rank0
from lmforge.train.config import TrainConfig


def add_run_args(p: argparse.ArgumentParser, model_help: str, data_help: str) -> None:
    """The arguments every training command shares: what to start from, the data, the run directory."""
    p.add_argument("--model", help=model_help)
    p.add_argument("--data", help=data_help)
    p.add_argument("--out", help="run directory (run.json, metrics.jsonl, loss.png, checkpoints/)")
    add_resume_args(p)


def add_resume_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true", default=None, help="continue the run in --out exactly")
    p.add_argument(
        "--overwrite", action="store_true", default=None, help="start a new run in --out, deleting the run there"
    )
    p.add_argument("--config", help="a JSON or TOML file with any of these options (flags given win)")


def training_summary(result, run_dir, plot, extra: str = "") -> str:
    """What a training command prints when it is done."""
    r = result
    val = f", val loss {r.val_loss:.4f}" if r.val_loss is not None else ""
    bpb = f", val {r.val_bpb:.3f} bits/byte" if r.val_bpb is not None else ""
    stopped = " (interrupted; resume with --resume)" if r.interrupted else ""
    skipped = f"; {r.skipped_steps} non-finite steps skipped" if r.skipped_steps else ""
    return (
        f"trained {r.steps} steps, {r.tokens:,} tokens in {r.elapsed_s:.0f} s{stopped}: "
        f"loss {r.final_loss:.4f}{val}{bpb}{extra}{skipped}\n"
        f"checkpoint: {r.checkpoint}\nmetrics: {run_dir / 'metrics.jsonl'}"
        + (f"\nplot: {plot}" if plot else "\n(install matplotlib for loss.png)")
    )


def _pretrain_args(p: argparse.ArgumentParser) -> None:
    add_run_args(
        p,
        "a preset, a config file, or an HF checkpoint directory to continue from",
        "directory written by `lmforge prepare`",
    )
    p.add_argument("--tokenizer", help="tokenizer directory (default: the one stored with the data)")
    add_options(p, TrainConfig, title="training options")
    add_parallel_options(p)


def add_parallel_options(p: argparse.ArgumentParser) -> None:
    """--parallel ddp|fsdp|tp|fsdp+tp and its settings (lmforge.parallel.mesh.ParallelConfig), under torchrun.
    Activation checkpointing is a training option (TrainConfig): it applies in one process too."""
    from lmforge.parallel.mesh import ParallelConfig

    add_options(p, ParallelConfig, title="parallelism (torchrun)")


def start_distributed(o: Options):
    """The run's ParallelConfig, having joined torchrun's process group when there is one."""
    from lmforge.parallel.mesh import ParallelConfig
    from lmforge.runtime import init_distributed

    parallel = o.build(ParallelConfig)
    init_distributed()
    return parallel


@contextlib.contextmanager
def distributed_run():
    """Leave torchrun's process group when the command is done (or failed), so every rank exits cleanly."""
    from lmforge.runtime import destroy

    try:
        yield
    finally:
        destroy()


@command(
    "pretrain", "train a model with next-token prediction (or GLM blank infilling) on prepared shards", _pretrain_args
)
def run_pretrain(args: argparse.Namespace) -> int:
    from lmforge.train.pretrain import pretrain

    o = Options(args, args.config)
    model, data, out_dir = o.require("model", "data", "out")
    cfg = o.build(TrainConfig)
    tokenizer, resume, overwrite = o.value("tokenizer"), bool(o.value("resume")), bool(o.value("overwrite"))
    parallel = start_distributed(o)
    o.check_file_used()
    with distributed_run():
        out = pretrain(
            model, data, out_dir, cfg, resume=resume, overwrite=overwrite, tokenizer=tokenizer, parallel=parallel
        )
    if is_rank0():
        print(training_summary(out.result, out.run_dir, out.plot))
    return 0


def _quickstart_args(p: argparse.ArgumentParser) -> None:
    from lmforge.quickstart import QuickstartOptions

    add_options(p, QuickstartOptions)


@command(
    "quickstart", "build a corpus, tokenizer and small model from Python's stdlib, train, evaluate", _quickstart_args
)
def run_quickstart(args: argparse.Namespace) -> int:
    from lmforge.quickstart import QuickstartOptions, run_quickstart, summary

    opts = Options(args).build(QuickstartOptions)
    print(summary(run_quickstart(opts)))
    return 0
