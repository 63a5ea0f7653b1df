"""`lmforge prune`: magnitude / 2:4 sparsity or structured removal of heads and FFN channels (docs/pruning.md)."""

from __future__ import annotations

import argparse

from lmforge.cli import command
from lmforge.commands.flags import Options, add_options
from lmforge.quant.prune import PruneConfig


def _prune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory (or run directory) to prune")
    p.add_argument("--out", help="output directory: an HF-format checkpoint, with the source's tokenizer files")
    p.add_argument("--data", help="prepared shards (`lmforge prepare`) for --recover-steps and --importance activation")
    p.add_argument(
        "--eval-data", help="prepared shards (their val split) or a text file: perplexity before and after pruning"
    )
    p.add_argument("--recover-run", help="keep the recovery fine-tune's run directory here (default: a temporary one)")
    p.add_argument("--config", help="a JSON or TOML file with any of these options (flags given win)")
    add_options(p, PruneConfig, title="pruning options")


@command(
    "prune",
    "prune a checkpoint: zero weights (magnitude, 2:4) or remove attention heads / FFN channels; optional recovery",
    _prune_args,
)
def run_prune(args: argparse.Namespace) -> int:
    from lmforge.quant.prune_run import format_outcome, prune_checkpoint

    o = Options(args, args.config)
    model, out = o.require("model", "out")
    cfg = o.build(PruneConfig)
    data, eval_data, recover_run = o.value("data"), o.value("eval_data"), o.value("recover_run")
    o.check_file_used()
    outcome = prune_checkpoint(model, out, cfg, data=data, eval_data=eval_data, recover_run=recover_run)
    print(format_outcome(outcome))
    return 0
