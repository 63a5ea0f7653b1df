"""`lmforge tokenizer` and `lmforge prepare`: from text files to a tokenizer and token shards."""

from __future__ import annotations

import argparse
import json

from lmforge.cli import command
from lmforge.errors import LmforgeError


def _tokenizer_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="<action>", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE tokenizer on text files")
    t.add_argument("inputs", nargs="+", help="text/JSONL/Parquet files, directories or glob patterns")
    t.add_argument("--out", required=True, help="directory to save tokenizer.json + tokenizer_config.json")
    t.add_argument("--vocab-size", type=int, default=4096, help="total vocabulary incl. special tokens")
    t.add_argument("--chat-format", default="llama3", help="llama3, llama3.1, chatml (Qwen 2.5) or glm4")
    t.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge")
    t.add_argument("--include", action="append", help="only files matching this glob inside directories")
    t.add_argument("--text-field", default="text", help="field holding the text in JSONL/Parquet")
    e = sub.add_parser("encode", help="show the tokens of a text")
    e.add_argument("tokenizer", help="tokenizer directory")
    e.add_argument("text")
    e.add_argument("--json", action="store_true", help="print the ids as JSON")


@command("tokenizer", "train a tokenizer, or show how one splits a text", _tokenizer_args)
def run_tokenizer(args: argparse.Namespace) -> int:
    from lmforge.tokenizer import Tokenizer

    if args.action == "encode":
        tok = Tokenizer.from_pretrained(args.tokenizer)
        ids = tok.encode(args.text)
        if args.json:
            print(json.dumps(ids))
        else:
            print(f"{len(ids)} tokens: " + " ".join(f"{tok.decode([i])!r}:{i}" for i in ids))
        return 0

    from lmforge.data import clean_documents, iter_documents

    texts, report = clean_documents(iter_documents(args.inputs, args.text_field, args.include), dedup=True)
    if not texts:
        raise LmforgeError(f"no text to train on in {args.inputs}:\n{report.format()}")
    tok = Tokenizer.train(texts, args.vocab_size, args.chat_format, args.min_frequency, show_progress=False)
    tok.save(args.out)
    nbytes = sum(len(t.encode()) for t in texts)
    ntok = sum(len(ids) for ids in tok.encode_batch(texts))
    print(
        f"trained a {tok.vocab_size}-token byte-level BPE ({args.chat_format} chat format) on {len(texts)} documents "
        f"({nbytes:,} bytes, {nbytes / max(ntok, 1):.2f} bytes/token); saved to {args.out}"
    )
    return 0


def _prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="text/JSONL/Parquet files, directories or glob patterns")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (e.g. from `lmforge tokenizer train`)")
    p.add_argument("--out", required=True, help="output directory for shards, index.json and val.txt")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out for validation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-field", default="text", help="field holding the text in JSONL/Parquet")
    p.add_argument("--include", action="append", help="only files matching this glob inside directories")
    p.add_argument("--normalize", default="NFC", choices=["NFC", "NFKC", "none"], help="Unicode normalisation")
    p.add_argument("--no-dedup", action="store_true", help="keep exact duplicates")
    p.add_argument("--near-dedup", action="store_true", help="also drop near duplicates (MinHash; needs datasketch)")
    p.add_argument("--near-dedup-threshold", type=float, default=0.8)
    p.add_argument("--min-chars", type=int, default=1)
    p.add_argument("--max-chars", type=int)
    p.add_argument("--shard-tokens", type=int, default=50_000_000, help="tokens per shard file")


@command("prepare", "clean, deduplicate and tokenize a corpus into token shards", _prepare_args)
def run_prepare(args: argparse.Namespace) -> int:
    from lmforge.data import prepare
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(args.tokenizer)
    report = prepare(
        args.inputs,
        tok,
        args.out,
        val_fraction=args.val_fraction,
        seed=args.seed,
        text_field=args.text_field,
        include=args.include,
        normalize=args.normalize,
        dedup=not args.no_dedup,
        near_dedup=args.near_dedup,
        near_dedup_threshold=args.near_dedup_threshold,
        min_chars=args.min_chars,
        max_chars=args.max_chars,
        shard_tokens=args.shard_tokens,
    )
    print(report.format())
    return 0
