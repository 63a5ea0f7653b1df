"""`lmforge pretrain` and `lmforge quickstart`."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from lmforge.cli import command
from lmforge.errors import LmforgeError
from lmforge.train.config import TrainConfig

_HELP = {
    "steps": "optimizer steps",
    "batch_size": "sequences per micro-batch",
    "seq_len": "tokens per sequence",
    "grad_accum": "micro-batches per step",
    "lr": "peak learning rate",
    "dtype": "float32 or bfloat16 (autocast)",
    "schedule": "cosine, wsd, linear or constant",
    "max_minutes": "stop after this many minutes (wall clock)",
    "mask_documents": "block-diagonal attention within packed documents",
    "objective": "causal (next token) or glm (GLM blank infilling; needs a glm4-format tokenizer)",
    "glm_variant": "with --objective glm: token, sentence, document or mixed spans",
    "compile": "torch.compile the model",
    "activation_checkpointing": "recompute activations in the backward pass to save memory",
}


def add_train_config_args(p: argparse.ArgumentParser) -> None:
    """One --flag per TrainConfig field (default: unset, so a --config file or the dataclass default applies)."""
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = type(f.default) if f.default is not None else float
        if kind is bool:
            p.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=_HELP.get(f.name, f"default {f.default}"),
            )
        else:
            p.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=_HELP.get(f.name, f"default {f.default}"))


def merged_options(args: argparse.Namespace, required: tuple[str, ...]) -> dict[str, Any]:
    """Options from --config (JSON/TOML) overridden by the flags given on the command line."""
    options: dict[str, Any] = dict(TrainConfig.from_file(args.config)) if getattr(args, "config", None) else {}
    options.update({k: v for k, v in vars(args).items() if k not in ("config", "run", "command") and v is not None})
    missing = [k for k in required if not options.get(k)]
    if missing:
        raise LmforgeError(f"missing {', '.join('--' + m.replace('_', '-') for m in missing)} (or set it in --config).")
    return options


def split_train_config(options: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any]]:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig.from_dict({k: v for k, v in options.items() if k in names}), {
        k: v for k, v in options.items() if k not in names
    }


def _pretrain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a preset, a config file, or an HF checkpoint directory to continue from")
    p.add_argument("--data", help="directory written by `lmforge prepare`")
    p.add_argument("--out", help="run directory (metrics.jsonl, loss.png, checkpoints/)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the one stored with the data)")
    p.add_argument("--resume", action="store_true", default=None, help="continue the run in --out exactly")
    p.add_argument("--config", help="a JSON or TOML file with any of these options")
    add_train_config_args(p)


@command(
    "pretrain", "train a model with next-token prediction (or GLM blank infilling) on prepared shards", _pretrain_args
)
def run_pretrain(args: argparse.Namespace) -> int:
    from lmforge.train.pretrain import pretrain

    options = merged_options(args, ("model", "data", "out"))
    cfg, rest = split_train_config(options)
    unknown = set(rest) - {"model", "data", "out", "tokenizer", "resume"}
    if unknown:
        raise LmforgeError(f"unknown options in --config: {sorted(unknown)}.")
    out = pretrain(
        rest["model"], rest["data"], rest["out"], cfg, resume=bool(rest.get("resume")), tokenizer=rest.get("tokenizer")
    )
    r = out.result
    val = f", val loss {r.val_loss:.4f}" if r.val_loss is not None else ""
    bpb = f", val {r.val_bpb:.3f} bits/byte" if r.val_bpb is not None else ""
    stopped = " (interrupted; resume with --resume)" if r.interrupted else ""
    print(
        f"trained {r.steps} steps, {r.tokens:,} tokens in {r.elapsed_s:.0f} s{stopped}: "
        f"loss {r.final_loss:.4f}{val}{bpb}"
        f"{f'; {r.skipped_steps} non-finite steps skipped' if r.skipped_steps else ''}\n"
        f"checkpoint: {r.checkpoint}\nmetrics: {out.run_dir / 'metrics.jsonl'}"
        + (f"\nplot: {out.plot}" if out.plot else "\n(install matplotlib for loss.png)")
    )
    return 0


def _quickstart_args(p: argparse.ArgumentParser) -> None:
    from lmforge.quickstart import QuickstartOptions

    defaults = QuickstartOptions()
    p.add_argument("--out", default=str(defaults.out), help="run directory (default: ./lmforge-quickstart)")
    p.add_argument("--minutes", type=float, default=defaults.minutes, help="training budget in minutes")
    p.add_argument("--vocab-size", type=int, default=defaults.vocab_size)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--dtype", default=defaults.dtype, choices=["float32", "bfloat16"])
    p.add_argument(
        "--stages",
        default="pretrain",
        help="pretrain, optionally followed by sft and dpo: the fine-tuning demo (e.g. pretrain,sft,dpo)",
    )


@command(
    "quickstart", "build a corpus, tokenizer and small model from Python's stdlib, train, evaluate", _quickstart_args
)
def run_quickstart(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lmforge.quickstart import QuickstartOptions, run_quickstart, summary

    if args.minutes <= 0:
        raise LmforgeError("--minutes must be positive.")
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    opts = QuickstartOptions(
        out=Path(args.out),
        minutes=args.minutes,
        vocab_size=args.vocab_size,
        seed=args.seed,
        dtype=args.dtype,
        stages=stages,
    )
    print(summary(run_quickstart(opts)))
    return 0
