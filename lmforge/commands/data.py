"""`lmforge tokenizer` and `lmforge prepare`: from text files to a tokenizer and token shards."""

from __future__ import annotations

import argparse
import json

from lmforge.cli import command
from lmforge.commands.flags import Options, add_options
from lmforge.data.config import PrepareConfig, TokenizerTrainConfig
from lmforge.errors import LmforgeError


def _tokenizer_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="<action>", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE tokenizer on text files")
    t.add_argument("inputs", nargs="+", help="text/JSONL/Parquet files, directories or glob patterns")
    t.add_argument("--out", required=True, help="directory to save tokenizer.json + tokenizer_config.json")
    add_options(t, TokenizerTrainConfig)
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

    cfg = Options(args).build(TokenizerTrainConfig)
    documents = iter_documents(args.inputs, cfg.text_field, list(cfg.include) or None)
    texts, report = clean_documents(documents, dedup=True)
    if not texts:
        raise LmforgeError(f"no text to train on in {args.inputs}:\n{report.format()}")
    tok = Tokenizer.train(texts, cfg.vocab_size, cfg.chat_format, cfg.min_frequency, show_progress=False)
    tok.save(args.out)
    nbytes = sum(len(t.encode()) for t in texts)
    ntok = sum(len(ids) for ids in tok.encode_batch(texts))
    print(
        f"trained a {tok.vocab_size}-token byte-level BPE ({cfg.chat_format} chat format) on {len(texts)} documents "
        f"({nbytes:,} bytes, {nbytes / max(ntok, 1):.2f} bytes/token); saved to {args.out}"
    )
    return 0


def _prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="text/JSONL/Parquet files, directories or glob patterns")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (e.g. from `lmforge tokenizer train`)")
    p.add_argument("--out", required=True, help="output directory for shards, index.json and val.txt")
    add_options(p, PrepareConfig)


@command("prepare", "clean, deduplicate and tokenize a corpus into token shards", _prepare_args)
def run_prepare(args: argparse.Namespace) -> int:
    from lmforge.data import prepare
    from lmforge.tokenizer import Tokenizer

    cfg = Options(args).build(PrepareConfig)
    tok = Tokenizer.from_pretrained(args.tokenizer)
    print(prepare(args.inputs, tok, args.out, cfg).format())
    return 0
