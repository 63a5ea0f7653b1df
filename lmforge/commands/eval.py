"""`lmforge eval`: multiple-choice, generation and perplexity tasks from local files."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.cli import command
from lmforge.commands.flags import Options, add_options
from lmforge.eval.run import EvalSettings
from lmforge.loading import LoadOptions


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory or run directory")
    p.add_argument(
        "--task",
        action="append",
        required=True,
        help="a JSONL task file (multiple choice or generation), a text file, or prepared shards (repeatable)",
    )
    p.add_argument("--type", choices=["choice", "generation", "perplexity"], help="override task type detection")
    p.add_argument("--out", help="directory for results.json and report.md (default: eval-<model name>)")
    add_options(p, LoadOptions)
    add_options(p, EvalSettings, title="evaluation options")


@command("eval", "evaluate a model: perplexity/bits per byte, multiple choice, generation metrics", _eval_args)
def run_eval(args: argparse.Namespace) -> int:
    from lmforge.commands.generate import load_for_use
    from lmforge.eval.run import format_table, run_task, write_results

    settings = Options(args).build(EvalSettings)
    model, tok = load_for_use(args.model, args)
    results = [run_task(model, tok, task, settings, args.type) for task in args.task]
    out = Path(args.out or f"eval-{Path(args.model).resolve().name}")
    json_path, md_path = write_results(results, args.model, settings, out)
    print(format_table(results))
    print(f"wrote {json_path} and {md_path} ({sum(r.seconds for r in results):.1f} s)")
    return 0
