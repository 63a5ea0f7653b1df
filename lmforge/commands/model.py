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
    p.add_argument("model", nargs="?", help="a preset name, an HF checkpoint directory, a .gguf file, or a config.json")
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
    from lmforge.checkpoint.gguf_read import gguf_tensor_types, is_gguf
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
    if is_gguf(args.model):  # what the file stores, as llama.cpp reports it on load
        stats["file"] = {"bytes": Path(args.model).stat().st_size, "tensor_types": gguf_tensor_types(args.model)}
    print(json.dumps(stats) if args.json else format_stats(args.model, stats))
    return 0


# --- convert ---------------------------------------------------------------------------------------
def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source",
        help="an HF checkpoint directory, a .gguf file, a preset name, or a config file (random weights)",
    )
    p.add_argument("out", help="output: a directory (HF format), or a file ending in .gguf (llama.cpp)")
    p.add_argument(
        "--dtype", help="HF output: float32, bfloat16 or float16 (default: keep; presets: their published dtype)"
    )
    p.add_argument(
        "--max-shard-size",
        help=f"HF output: split weights into files of at most this size (default {MAX_SHARD_SIZE})",
    )
    p.add_argument(
        "--quant",
        help="GGUF output: f32 (default), f16, q8_0 or q4_0; norms, biases and rows that do not split into "
        "blocks stay f32 (docs/gguf.md)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for random initialisation (default 0)")


def _check_convert_flags(args: argparse.Namespace, to_gguf: bool) -> None:
    # An option that does not apply to the chosen output is refused, not silently ignored.
    from lmforge.checkpoint.gguf_write import QUANTS

    if to_gguf:
        for flag, value in (("--dtype", args.dtype), ("--max-shard-size", args.max_shard_size)):
            if value is not None:
                raise LmforgeError(f"{flag} applies to HF output; a .gguf file's tensor types are set by --quant.")
        if args.quant is not None and args.quant not in QUANTS:
            raise LmforgeError(f"unknown --quant {args.quant!r}; use one of {', '.join(QUANTS)}.")
    elif args.quant is not None:
        raise LmforgeError(f"--quant applies to GGUF output; name the output file {args.out}.gguf to write one.")


@command(
    "convert",
    "re-save a checkpoint (dtype, shards), write a random one, or convert to and from GGUF (llama.cpp)",
    _convert_args,
)
def run_convert(args: argparse.Namespace) -> int:
    import torch

    from lmforge.checkpoint import companion_files, config_from_spec, load_pretrained, save_pretrained
    from lmforge.config import dtype_from_name
    from lmforge.info import human
    from lmforge.model import Transformer
    from lmforge.tokenizer import Tokenizer

    source, to_gguf = Path(args.source), args.out.lower().endswith(".gguf")
    _check_convert_flags(args, to_gguf)
    dtype = dtype_from_name(args.dtype) if args.dtype else None
    shard_size = args.max_shard_size or MAX_SHARD_SIZE
    extra: dict[str, str] = {}
    tokenizer = None
    if source.suffix.lower() == ".gguf":
        from lmforge.checkpoint.gguf_read import gguf_to_hf, load_gguf_with_tokenizer

        if not to_gguf:
            out, has_tokenizer = gguf_to_hf(source, args.out, dtype=dtype, max_shard_size=shard_size)
            files = sorted(p.name for p in out.iterdir())
            note = "" if has_tokenizer else "; the file has no tokenizer"
            print(f"imported {source}; wrote {out} ({len(files)} files: {', '.join(files)}{note})")
            return 0
        model, tokenizer = load_gguf_with_tokenizer(source)
        what = f"loaded {source}"
    elif source.is_dir():
        model = load_pretrained(source)
        what = f"loaded {source}"
        extra = companion_files(source)  # sampling defaults and the tokenizer travel with the weights
        if to_gguf and (source / "tokenizer.json").is_file():
            tokenizer = Tokenizer.from_pretrained(source)
    else:
        config = config_from_spec(args.source)
        torch.manual_seed(args.seed)
        model = Transformer(config, dtype=dtype or dtype_from_name(config.dtype))
        what = f"initialised {args.source} randomly (seed {args.seed}, std {config.initializer_range})"
    if to_gguf:
        from lmforge.checkpoint.gguf_write import save_gguf

        quant = args.quant or "f32"
        out = save_gguf(model, args.out, quant=quant, tokenizer=tokenizer)
        vocab = "tokenizer embedded" if tokenizer is not None else "no tokenizer: the source has none"
        print(f"{what}; wrote {out} ({human(out.stat().st_size, 'B')}, {quant}; {vocab})")
        return 0
    out = save_pretrained(model, args.out, dtype=dtype, max_shard_size=shard_size, extra_files=extra)
    files = sorted(p.name for p in out.iterdir())
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(f"{what}; wrote {out} ({human(size, 'B')} in {len(files)} files: {', '.join(files)})")
    return 0
