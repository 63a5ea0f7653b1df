"""`lmforge <command>`: thin wrappers over the library. User errors print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from lmforge.errors import LmforgeError

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(
    name: str, help: str, add_args: Callable[[argparse.ArgumentParser], None]
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Register a command: its one-line help, its argument builder and (decorated) its runner."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = (help, add_args, run)
        return run

    return register


# --- info ------------------------------------------------------------------------------------------
def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="a preset name, an HF checkpoint directory, or a config.json")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--seq-len", type=int, default=2048, help="sequence length for FLOPs per token (default 2048)")
    p.add_argument("--list", action="store_true", help="list the presets and exit")


@command("info", "parameters, memory, KV-cache and FLOPs of a preset or checkpoint", _info_args)
def run_info(args: argparse.Namespace) -> int:
    from lmforge.config import ModelConfig, list_presets
    from lmforge.info import format_stats, human, model_stats

    if args.list or args.model is None:
        if not args.list:
            raise LmforgeError("give a preset name or a checkpoint directory, e.g. `lmforge info qwen2.5-0.5b`.")
        rows = []
        for name in list_presets():
            stats = model_stats(ModelConfig.from_preset(name))
            rows.append({"name": name, "params": stats["params"], "family": stats["config"]["family"]})
        if args.json:
            print(json.dumps(rows))
        else:
            for r in rows:
                print(f"{r['name']:<18}{r['family']:<7}{human(r['params']):>9}")
        return 0
    if args.seq_len <= 0:
        raise LmforgeError("--seq-len must be positive.")
    config = ModelConfig.from_spec(args.model)
    stats = model_stats(config, args.seq_len)
    print(json.dumps(stats) if args.json else format_stats(args.model, stats))
    return 0


# --- convert ---------------------------------------------------------------------------------------
def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="an HF checkpoint directory, a preset name, or a config file (random weights)")
    p.add_argument("out", help="output directory (HF format)")
    p.add_argument("--dtype", help="float32, bfloat16 or float16 (default: keep; presets: their published dtype)")
    p.add_argument("--max-shard-size", default="5GB", help="split weights into files of at most this size")
    p.add_argument("--seed", type=int, default=0, help="seed for random initialisation")


@command("convert", "re-save a checkpoint (dtype, shards) or write a randomly initialised one", _convert_args)
def run_convert(args: argparse.Namespace) -> int:
    import torch

    from lmforge.checkpoint import load_pretrained, save_pretrained
    from lmforge.config import ModelConfig, dtype_from_name
    from lmforge.info import human
    from lmforge.model import Transformer

    dtype = dtype_from_name(args.dtype) if args.dtype else None
    source = Path(args.source)
    if source.is_dir():
        model = load_pretrained(source)
        what = f"loaded {source}"
    else:
        config = ModelConfig.from_spec(args.source)
        torch.manual_seed(args.seed)
        model = Transformer(config, dtype=dtype or dtype_from_name(config.dtype))
        what = f"initialised {args.source} randomly (seed {args.seed}, std {config.initializer_range})"
    out = save_pretrained(model, args.out, dtype=dtype, max_shard_size=args.max_shard_size)
    files = sorted(p.name for p in out.iterdir())
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(f"{what}; wrote {out} ({human(size, 'B')} in {len(files)} files: {', '.join(files)})")
    return 0


# --- entry point -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge", description="Train, load, run and evaluate Llama 3, Qwen 2.5 and GLM-4 style models."
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (help_text, add_args, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except LmforgeError as e:
        print(f"lmforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmforge {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
