"""`lmforge generate`, `lmforge chat` and `lmforge bench`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from lmforge.cli import command
from lmforge.commands.flags import Options, add_options, given
from lmforge.errors import LmforgeError
from lmforge.loading import LoadOptions, describe_precision, load_model_and_tokenizer

CHAT_MAX_NEW_TOKENS = 256  # a reply, not a completion: longer than generate's default of 32


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """The model's loading options and one flag per GenerationOptions field."""
    from lmforge.generate.options import GenerationOptions

    add_options(p, LoadOptions)
    add_options(p, GenerationOptions, title="generation options")


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    """The GenerationOptions given on the command line (the rest keep the library's defaults)."""
    from lmforge.generate.options import GenerationOptions

    built = Options(args).build(GenerationOptions)  # checks the values given
    return {name: getattr(built, name) for name in given(args, GenerationOptions)}


def load_options(args: argparse.Namespace) -> LoadOptions:
    return Options(args).build(LoadOptions)


def load_for_use(spec: str, args: argparse.Namespace, need_tokenizer: bool = True) -> tuple[Any, Any]:
    """Load the model with the command's --dtype and say on stderr which precision it runs in."""
    dtype = load_options(args).dtype
    model, tok = load_model_and_tokenizer(spec, dtype, need_tokenizer)
    print(describe_precision(model, dtype), file=sys.stderr)
    return model, tok


# --- generate --------------------------------------------------------------------------------------
def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory or run directory")
    p.add_argument("--prompt", help="the prompt text (default: read from stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn in the chat format")
    p.add_argument("--system", help="system message (with --chat)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--draft-model", help="a smaller model with the same tokenizer for speculative decoding")
    p.add_argument(
        "--num-draft-tokens", type=int, default=argparse.SUPPRESS, help="with --draft-model: tokens drafted per step"
    )
    p.add_argument("--infill", help="text with [MASK] blanks for a GLM-objective model to fill")
    p.add_argument("--json", action="store_true", help="print the generated ids and text as JSON")
    add_generation_args(p)


def encode_prompt(tokenizer: Any, text: str, chat: bool, system: str | None) -> list[int]:
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=True)


@command("generate", "complete a prompt (greedy, sampling, beams, speculative, streaming)", _generate_args)
def run_generate(args: argparse.Namespace) -> int:
    from lmforge.generate.api import generate, generate_stream

    if args.infill is not None:
        return _run_infill(args)
    model, tok = load_for_use(args.model, args)
    text = args.prompt if args.prompt is not None else sys.stdin.read()
    if not text:
        raise LmforgeError("empty prompt: pass --prompt or pipe text on stdin.")
    ids = encode_prompt(tok, text, args.chat, args.system)
    options = generation_options(args)
    if args.chat:
        options.setdefault("eos_token_id", tok.stop_token_ids)
    t0 = time.perf_counter()
    if args.draft_model:
        from lmforge.generate.speculative import speculative_generate

        unsupported = set(options) - {"max_new_tokens", "eos_token_id"}
        if unsupported:
            raise LmforgeError(f"speculative decoding is greedy; drop {sorted(unsupported)} or --draft-model.")
        draft, _ = load_for_use(args.draft_model, args, need_tokenizer=False)
        drafted = {"num_draft_tokens": args.num_draft_tokens} if hasattr(args, "num_draft_tokens") else {}
        from lmforge.generate.options import GenerationOptions

        options.setdefault("max_new_tokens", GenerationOptions().max_new_tokens)
        r = speculative_generate(model, draft, ids, **options, **drafted)
        outputs = [r.tokens]
        print(("" if args.chat else text) + tok.decode(r.tokens, skip_special_tokens=True))
        print(
            f"speculative: {len(r.tokens)} tokens, {r.accepted}/{r.drafted} drafts accepted "
            f"({r.acceptance_rate:.0%}), {r.target_forwards} target forwards, {r.seconds:.2f} s",
            file=sys.stderr,
        )
        return 0
    if args.stream:
        if not args.chat:
            print(text, end="", flush=True)
        outputs = [[]]
        for chunk in generate_stream(model, ids, tokenizer=tok, **options):
            outputs[0].append(chunk.token_id)
            print(chunk.text, end="", flush=True)
        print()
    else:
        result = generate(model, ids, tokenizer=tok, **options)
        outputs = result if result and isinstance(result[0], list) else [result]
        for i, out in enumerate(outputs):
            if len(outputs) > 1:
                print(f"--- sequence {i + 1}")
            if args.json:
                print(json.dumps({"ids": out, "text": tok.decode(out, skip_special_tokens=True)}))
            else:
                print(("" if args.chat else text) + tok.decode(out, skip_special_tokens=True))
    dt = time.perf_counter() - t0
    n = sum(len(o) for o in outputs)
    print(f"{n} tokens in {dt:.2f} s ({n / dt:.1f} tokens/s)", file=sys.stderr)
    return 0


# --- chat ------------------------------------------------------------------------------------------
def _chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory or run directory")
    p.add_argument("--system", help="system message")
    add_generation_args(p)


@command("chat", "talk to a model in its chat format (/reset clears the history, /exit quits)", _chat_args)
def run_chat(args: argparse.Namespace) -> int:
    from lmforge.generate.api import generate_stream

    model, tok = load_for_use(args.model, args)
    options = generation_options(args)
    options.setdefault("max_new_tokens", CHAT_MAX_NEW_TOKENS)
    options.setdefault("eos_token_id", tok.stop_token_ids)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    print(
        f"chatting with {args.model} ({tok.chat_format or 'template'} format); /reset clears, /exit quits",
        file=sys.stderr,
    )
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history.clear()
            print("(history cleared)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        ids = tok.apply_chat_template(system + history, add_generation_prompt=True)
        limit = model.config.max_position_embeddings - options["max_new_tokens"]
        while len(ids) > limit and len(history) > 1:  # forget the oldest turns first
            del history[:2]
            ids = tok.apply_chat_template(system + history, add_generation_prompt=True)
        if len(ids) > limit:
            raise LmforgeError("the message alone is longer than the model's context; shorten it.")
        reply_ids: list[int] = []
        for chunk in generate_stream(model, ids, tokenizer=tok, **options):
            if chunk.token_id not in tok.stop_token_ids:
                reply_ids.append(chunk.token_id)
            print(chunk.text, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": tok.decode(reply_ids, skip_special_tokens=True)})
    return 0


# --- bench -----------------------------------------------------------------------------------------
def _bench_args(p: argparse.ArgumentParser) -> None:
    from lmforge.generate.bench import BenchConfig

    p.add_argument("--model", required=True, help="checkpoint/run directory, or a preset (random weights)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_options(p, LoadOptions)
    add_options(p, BenchConfig)


@command("bench", "prefill and decode speed in llama-bench style (ppN / tgN, mean and spread)", _bench_args)
def run_bench(args: argparse.Namespace) -> int:
    import torch

    from lmforge.generate.bench import BenchConfig, bench_model
    from lmforge.info import human

    bench = Options(args).build(BenchConfig)
    dtype_name = load_options(args).dtype
    if Path(args.model).exists():
        model, _ = load_model_and_tokenizer(args.model, dtype_name, need_tokenizer=False)
    else:  # a preset or config file: random weights in the published dtype, unless slow here
        from lmforge.checkpoint import config_from_spec
        from lmforge.config import dtype_from_name
        from lmforge.model import Transformer
        from lmforge.runtime import inference_dtype

        config = config_from_spec(args.model)
        model = Transformer(config, dtype=inference_dtype(dtype_name, dtype_from_name(config.dtype)))
    rows = bench_model(model, bench)
    params = sum(p.numel() for p in model.parameters())
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    c = model.config
    # K and V for every layer, kv heads only (GQA stores num_kv_heads, not num_heads).
    kv_per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * next(model.parameters()).element_size()
    if args.json:
        print(
            json.dumps(
                {
                    "model": args.model,
                    "params": params,
                    "dtype": dtype,
                    "threads": torch.get_num_threads(),
                    "compile": bench.compile,
                    "kv_cache_bytes_per_token": kv_per_token,
                    "results": rows,
                }
            )
        )
        return 0
    print("| model | params | dtype | threads | test | t/s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {args.model} | {human(params)} | {dtype} | {torch.get_num_threads()} | {r['test']} | "
            f"{r['mean']:.2f} ± {r['std']:.2f} |"
        )
    full = kv_per_token * (bench.prompt_tokens + bench.gen_tokens)
    print(
        f"KV cache: {human(kv_per_token, 'B')} per token ({c.num_kv_heads} of {c.num_heads} heads stored), "
        f"{human(full, 'B')} for {bench.prompt_tokens + bench.gen_tokens} tokens"
    )
    return 0


def _run_infill(args: argparse.Namespace) -> int:
    """`lmforge generate --model DIR --infill "text with [MASK] inside"`: print the filled text."""
    from lmforge.generate.infill import infill_with_spans

    clashing = [
        flag
        for flag, given in (
            ("--prompt", getattr(args, "prompt", None) is not None),
            ("--chat", getattr(args, "chat", False)),
            ("--stream", getattr(args, "stream", False)),
            ("--draft-model", getattr(args, "draft_model", None)),
        )
        if given
    ]
    if clashing:
        raise LmforgeError(f"--infill takes the whole text itself; drop {', '.join(clashing)}.")
    model, tok = load_for_use(args.model, args)
    options = generation_options(args)
    t0 = time.perf_counter()
    text, spans = infill_with_spans(model, tok, args.infill, **options)
    dt = time.perf_counter() - t0
    if getattr(args, "json", False):
        fills = [tok.decode(s, skip_special_tokens=True) for s in spans]
        print(json.dumps({"text": text, "spans": fills, "ids": spans}))
    else:
        print(text)
    n = sum(len(s) for s in spans)
    print(f"filled {len(spans)} blank(s) with {n} tokens in {dt:.2f} s", file=sys.stderr)
    return 0
