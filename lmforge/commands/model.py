"""`lmforge info` and `lmforge convert`: inspect and re-save model checkpoints."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmforge.checkpoint import MAX_SHARD_SIZE
from lmforge.cli import command
from lmforge.errors import LmforgeError
from lmforge.info import FLOPS_SEQ_LEN


# --- info ------------------------------------------------------------------------------------------
def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="a preset name, an HF checkpoint directory, or a config.json")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument(
        "--seq-len",
        type=int,
        default=FLOPS_SEQ_LEN,
        help=f"sequence length for FLOPs per token (default {FLOPS_SEQ_LEN})",
    )
    p.add_argument("--list", action="store_true", help="list the presets and exit")


@command("info", "parameters, memory, KV-cache and FLOPs of a preset or checkpoint", _info_args)
def run_info(args: argparse.Namespace) -> int:
    from lmforge.checkpoint import config_from_spec
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
    config = config_from_spec(args.model)
    stats = model_stats(config, args.seq_len)
    print(json.dumps(stats) if args.json else format_stats(args.model, stats))
    return 0


# --- convert ---------------------------------------------------------------------------------------
def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="an HF checkpoint directory, a preset name, or a config file (random weights)")
    p.add_argument("out", help="output directory (HF format)")
    p.add_argument("--dtype", help="float32, bfloat16 or float16 (default: keep; presets: their published dtype)")
    p.add_argument(
        "--max-shard-size",
        default=MAX_SHARD_SIZE,
        help=f"split weights into files of at most this size (default {MAX_SHARD_SIZE})",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for random initialisation (default 0)")


@command("convert", "re-save a checkpoint (dtype, shards) or write a randomly initialised one", _convert_args)
def run_convert(args: argparse.Namespace) -> int:
    import torch

    from lmforge.checkpoint import config_from_spec, load_pretrained, save_pretrained
    from lmforge.config import dtype_from_name
    from lmforge.info import human
    from lmforge.model import Transformer
    from lmforge.tokenizer import tokenizer_files

    dtype = dtype_from_name(args.dtype) if args.dtype else None
    source = Path(args.source)
    extra: dict[str, str] = {}
    if source.is_dir():
        model = load_pretrained(source)
        what = f"loaded {source}"
        # Sampling defaults and the tokenizer travel with the weights.
        for f in [*tokenizer_files(source), source / "generation_config.json"]:
            if f.is_file():
                extra[f.name] = f.read_text()
    else:
        config = config_from_spec(args.source)
        torch.manual_seed(args.seed)
        model = Transformer(config, dtype=dtype or dtype_from_name(config.dtype))
        what = f"initialised {args.source} randomly (seed {args.seed}, std {config.initializer_range})"
    out = save_pretrained(model, args.out, dtype=dtype, max_shard_size=args.max_shard_size, extra_files=extra)
    files = sorted(p.name for p in out.iterdir())
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(f"{what}; wrote {out} ({human(size, 'B')} in {len(files)} files: {', '.join(files)})")
    return 0
