"""`lmforge quantize`: weight-only int8 / int4 checkpoints (docs/quantization.md)."""

from __future__ import annotations

import argparse

from lmforge.cli import command
from lmforge.commands.flags import Options, add_options
from lmforge.quant.quantize import QuantConfig


def _quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="float checkpoint directory (HF format)")
    p.add_argument("--out", help="output directory: the quantized checkpoint, with the source's tokenizer files")
    p.add_argument("--eval-data", help="prepared shards (their val split) or a text file: perplexity before and after")
    p.add_argument("--config", help="a JSON or TOML file with any of these options (flags given win)")
    add_options(p, QuantConfig, title="quantization options")


@command(
    "quantize", "quantize a checkpoint's linear layers to int8 or int4 (weight-only), loadable back", _quantize_args
)
def run_quantize(args: argparse.Namespace) -> int:
    from lmforge.quant.quantize_run import quantize_checkpoint

    o = Options(args, args.config)
    model, out = o.require("model", "out")
    cfg = o.build(QuantConfig)
    eval_data = o.value("eval_data")
    o.check_file_used()
    print(quantize_checkpoint(model, out, cfg, eval_data=eval_data))
    return 0
