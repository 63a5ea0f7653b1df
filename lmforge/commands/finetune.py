"""`lmforge finetune` (SFT, full or LoRA; --merge), `lmforge dpo` and `lmforge distill`."""

from __future__ import annotations

import argparse
from typing import Any

from lmforge.cli import command
from lmforge.commands.train import add_train_config_args, merged_options, split_train_config
from lmforge.errors import LmforgeError

_RUN_KEYS = {
    "model",
    "data",
    "out",
    "resume",
    "method",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_targets",
    "val_fraction",
    "too_long",
}


def _common(p: argparse.ArgumentParser, data_help: str) -> None:
    p.add_argument("--model", help="checkpoint directory (or run directory) to start from")
    p.add_argument("--data", help=data_help)
    p.add_argument("--out", help="run directory (metrics.jsonl, loss.png, checkpoints/)")
    p.add_argument("--resume", action="store_true", default=None, help="continue the run in --out exactly")
    p.add_argument("--config", help="a JSON or TOML file with any of these options")
    p.add_argument("--method", choices=["full", "lora"], default=None, help="train all weights or LoRA adapters")
    p.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default 8)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha; scaling = alpha / r (default 16)")
    p.add_argument("--lora-dropout", type=float, default=None, help="dropout on the LoRA input (default 0)")
    p.add_argument("--lora-targets", default=None, help="comma-separated: q,k,v,o,gate,up,down (default q,v)")
    p.add_argument("--val-fraction", type=float, default=None, help="held-out share of the examples")
    p.add_argument(
        "--too-long",
        choices=["truncate", "skip"],
        default=None,
        help="examples longer than --seq-len: cut them or leave them out (default truncate)",
    )
    add_train_config_args(p)


def _lora_config(options: dict[str, Any]) -> Any:
    if options.get("method", "full") != "lora":
        return None
    from lmforge.finetune.lora import LoraConfig

    targets = tuple(t.strip() for t in str(options.get("lora_targets") or "q,v").split(",") if t.strip())
    return LoraConfig(
        r=int(options.get("lora_r") or 8),
        alpha=float(options.get("lora_alpha") or 16.0),
        dropout=float(options.get("lora_dropout") or 0.0),
        targets=targets,
    )


def _split(options: dict[str, Any], extra: set[str]) -> tuple[Any, dict[str, Any]]:
    cfg, rest = split_train_config(options)
    unknown = set(rest) - _RUN_KEYS - extra
    if unknown:
        raise LmforgeError(f"unknown options: {sorted(unknown)}.")
    return cfg, rest


def _summary(result: Any, run_dir: Any, plot: Any, extra: str = "") -> str:
    r = result
    val = f", val loss {r.val_loss:.4f}" if r.val_loss is not None else ""
    stopped = " (interrupted; resume with --resume)" if r.interrupted else ""
    return (
        f"trained {r.steps} steps in {r.elapsed_s:.0f} s{stopped}: loss {r.final_loss:.4f}{val}{extra}\n"
        f"checkpoint: {r.checkpoint}\nmetrics: {run_dir / 'metrics.jsonl'}" + (f"\nplot: {plot}" if plot else "")
    )


def _lora_line(start: Any) -> str:
    if start.report is None:
        return ""
    rep = start.report
    return (
        f"\nLoRA: {rep.trainable:,} trainable of {rep.total:,} parameters ({rep.trainable_percent:.2f}%), "
        f"~{rep.memory_saved_bytes / 1e6:.1f} MB of gradients and optimizer state saved vs full fine-tuning"
    )


# --- finetune --------------------------------------------------------------------------------------
def _finetune_args(p: argparse.ArgumentParser) -> None:
    _common(p, "chat JSONL ({'messages': [...]}) or instruction JSONL ({'instruction', 'input', 'output'})")
    p.add_argument(
        "--no-pack",
        dest="pack",
        action="store_false",
        default=None,
        help="one example per row instead of packing short examples together",
    )
    p.add_argument("--merge", action="store_true", help="fold --adapter into --model and write --out")
    p.add_argument("--adapter", help="with --merge: a LoRA adapter directory (PEFT format)")


@command(
    "finetune", "supervised fine-tuning on chat/instruction data (full or LoRA); --merge folds adapters", _finetune_args
)
def run_finetune(args: argparse.Namespace) -> int:
    if args.merge:
        return _merge(args)
    from lmforge.finetune.sft import finetune

    options = merged_options(args, ("model", "data", "out"))
    options.pop("merge", None)
    options.pop("adapter", None)
    pack = options.pop("pack", True)
    cfg, rest = _split(options, set())
    out = finetune(
        rest["model"],
        rest["data"],
        rest["out"],
        cfg,
        method=rest.get("method") or "full",
        lora=_lora_config(rest),
        val_fraction=float(rest.get("val_fraction") or 0.05),
        pack=pack is not False,
        too_long=rest.get("too_long") or "truncate",
        resume=bool(rest.get("resume")),
    )
    print(f"data: {out.data.format()}" + _lora_line(out.start))
    print(_summary(out.result, out.run_dir, out.plot))
    return 0


def _merge(args: argparse.Namespace) -> int:
    from lmforge.checkpoint import load_pretrained, save_pretrained
    from lmforge.finetune.lora import load_adapter, merge_lora
    from lmforge.tokenizer import tokenizer_files
    from lmforge.train.checkpoints import resolve_model_dir

    if not (args.model and args.adapter and args.out):
        raise LmforgeError("--merge needs --model (the base), --adapter and --out.")
    base = resolve_model_dir(args.model)
    model = load_pretrained(base)
    load_adapter(model, resolve_model_dir(args.adapter))
    merge_lora(model)
    extra = {f.name: f.read_text() for f in [*tokenizer_files(base), base / "generation_config.json"] if f.is_file()}
    out = save_pretrained(model, args.out, extra_files=extra)
    print(f"merged {args.adapter} into {base}; wrote {out} (HF format)")
    return 0


# --- dpo -------------------------------------------------------------------------------------------
def _dpo_args(p: argparse.ArgumentParser) -> None:
    _common(p, "preference JSONL ({'prompt', 'chosen', 'rejected'})")
    p.add_argument("--beta", type=float, default=None, help="strength of the pull towards the reference (0.1)")
    p.add_argument("--loss", dest="loss_type", choices=["sigmoid", "ipo"], default=None, help="DPO (sigmoid) or IPO")
    p.add_argument(
        "--no-chat-format",
        dest="chat",
        action="store_false",
        default=None,
        help="concatenate prompt and response instead of rendering them as a chat",
    )


@command("dpo", "preference optimisation (DPO or IPO) against the frozen starting model", _dpo_args)
def run_dpo(args: argparse.Namespace) -> int:
    from lmforge.finetune.dpo import dpo

    options = merged_options(args, ("model", "data", "out"))
    beta, loss_type, chat = options.pop("beta", 0.1), options.pop("loss_type", "sigmoid"), options.pop("chat", None)
    cfg, rest = _split(options, set())
    out = dpo(
        rest["model"],
        rest["data"],
        rest["out"],
        cfg,
        beta=float(beta or 0.1),
        loss_type=loss_type or "sigmoid",
        method=rest.get("method") or "full",
        lora=_lora_config(rest),
        chat=chat,
        val_fraction=float(rest.get("val_fraction") or 0.1),
        too_long=rest.get("too_long") or "truncate",
        resume=bool(rest.get("resume")),
    )
    last = next((h for h in reversed(out.result.history) if "preference_accuracy" in h), {})
    extra = (
        (
            f"; last step: reward margin {last.get('reward_margin', 0):.3f}, "
            f"preference accuracy {last.get('preference_accuracy', 0):.2f}"
        )
        if last
        else ""
    )
    print(f"pairs: {out.counts}" + _lora_line(out.start))
    print(_summary(out.result, out.run_dir, out.plot, extra))
    return 0


# --- distill ---------------------------------------------------------------------------------------
def _distill_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", help="teacher checkpoint directory (its tokenizer is shared)")
    p.add_argument("--student", help="student checkpoint directory, preset or config file (random init)")
    p.add_argument("--data", help="directory written by `lmforge prepare` with the teacher's tokenizer")
    p.add_argument("--out", help="run directory")
    p.add_argument("--resume", action="store_true", default=None)
    p.add_argument("--config", help="a JSON or TOML file with any of these options")
    p.add_argument("--temperature", type=float, default=None, help="softmax temperature of the soft targets (2)")
    p.add_argument("--alpha", type=float, default=None, help="weight of the KL term; 1 - alpha weighs the CE (0.5)")
    add_train_config_args(p)


@command("distill", "train a student on a teacher's distribution (KL) mixed with cross-entropy", _distill_args)
def run_distill(args: argparse.Namespace) -> int:
    from lmforge.finetune.distill import distill

    options = merged_options(args, ("teacher", "student", "data", "out"))
    temperature, alpha = options.pop("temperature", None), options.pop("alpha", None)
    cfg, rest = split_train_config(options)
    unknown = set(rest) - {"teacher", "student", "data", "out", "resume"}
    if unknown:
        raise LmforgeError(f"unknown options: {sorted(unknown)}.")
    out = distill(
        rest["teacher"],
        rest["student"],
        rest["data"],
        rest["out"],
        cfg,
        temperature=float(temperature or 2.0),
        alpha=float(0.5 if alpha is None else alpha),
        resume=bool(rest.get("resume")),
    )
    print(_summary(out.result, out.run_dir, out.plot))
    return 0
