"""`lmforge eval`: multiple-choice, generation and perplexity tasks from local files."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.cli import command
from lmforge.errors import LmforgeError


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
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, help="evaluate the first N examples only")
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--fewshot-file", help="multiple-choice JSONL the few-shot examples are drawn from")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing few-shot examples")
    p.add_argument("--max-length", type=int, help="context length for scoring (default: the model's)")
    p.add_argument("--stride", type=int, help="perplexity: tokens predicted per window (default: max length)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generation tasks")
    p.add_argument("--temperature", type=float, help="generation tasks: sample at this temperature")
    p.add_argument("--dtype", help="float32 or bfloat16 (default: as stored)")


@command("eval", "evaluate a model: perplexity/bits per byte, multiple choice, generation metrics", _eval_args)
def run_eval(args: argparse.Namespace) -> int:
    from lmforge.eval.run import EvalSettings, format_table, run_task, write_results
    from lmforge.loading import load_model_and_tokenizer

    if args.batch_size <= 0 or (args.limit is not None and args.limit <= 0) or args.num_fewshot < 0:
        raise LmforgeError("--batch-size and --limit must be positive and --num-fewshot >= 0.")
    model, tok = load_model_and_tokenizer(args.model, args.dtype)
    generation = {}
    if args.temperature is not None:
        generation = {"do_sample": args.temperature > 0, "temperature": args.temperature, "seed": args.seed}
    settings = EvalSettings(
        batch_size=args.batch_size,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        fewshot_file=args.fewshot_file,
        seed=args.seed,
        max_length=args.max_length,
        stride=args.stride,
        max_new_tokens=args.max_new_tokens,
        generation=generation,
    )
    results = [run_task(model, tok, task, settings, args.type) for task in args.task]
    out = Path(args.out or f"eval-{Path(args.model).resolve().name}")
    json_path, md_path = write_results(results, args.model, settings, out)
    print(format_table(results))
    print(f"wrote {json_path} and {md_path} ({sum(r.seconds for r in results):.1f} s)")
    return 0
