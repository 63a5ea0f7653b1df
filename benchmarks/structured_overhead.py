"""Structured output: grammar compile time and per-token mask time, xgrammar vs outlines-core.

For byte-level BPE tokenizers of ~2k and ~32k tokens trained here with `Tokenizer.train(..., "llama3")` on
the Python standard library's source, each library compiles a JSON schema (an object with string,
integer, enum, array and nested-object fields) and `json_object` (any JSON object), then walks a fixed
document that fits the grammar token by token. Per token it times the mask (grammar state -> bool [V]
torch tensor, the form the engine applies) and the advance. Compile time is a fresh compile (caches off),
apart from the one-off per-tokenizer vocabulary setup, reported on its own. Medians over repeats.

outlines-core compiles a regex (its JSON schemas are converted to regexes), so json_object there is
its regex for {"type": "object"}, which caps nesting at max_recursion_depth=3; xgrammar compiles a
context-free grammar. Both masks are 32-bit-word bitmasks unpacked the same way.

Also timed: lmforge's own GrammarConstraint (xgrammar), allowed() + advance() per token, and the cost of
a fresh per-request constraint from a cached grammar.

    python benchmarks/structured_overhead.py            # ~2k and ~32k vocabularies
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sysconfig
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from lmforge.generate.structured import compile_grammar
from lmforge.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}, "lat": {"type": "number"}},
            "required": ["city", "zip", "lat"],
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "address", "active"],
}
# Documents in the one-line ", " / ": " layout both libraries accept.
SCHEMA_DOC = (
    '{"name": "Ada Lovelace", "age": 36, "role": "admin", "tags": ["math", "engines", "poetry"], '
    '"address": {"city": "London", "zip": "W1", "lat": 51.5072}, "active": true}'
)
OBJECT_DOC = (
    '{"id": 7, "user": {"name": "Ann", "tags": ["x", "y"], "karma": -1.5e+3}, "ok": true, '
    '"note": "the quick brown fox jumps over the lazy dog", "parent": null}'
)


def stdlib_texts(limit: int = 1500) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in sorted(root.rglob("*.py")) if "test" not in f.parts and "tests" not in f.parts]
    return [f.read_text(encoding="utf-8", errors="replace") for f in files[:limit]]


def cpu() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    simd = [f for f in flags if f.startswith(("sse", "ssse", "avx", "fma", "bmi", "popcnt", "f16c", "amx"))]
    return f"{model}, {len(simd)} SIMD flags: {' '.join(simd)}"


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def unpack(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")
    return torch.from_numpy(bits[:vocab].view(np.bool_))


def walk(
    new_state: Callable[[], object],
    mask: Callable[[object], torch.Tensor],
    step: Callable,
    ids: list[int],
    repeats: int,
) -> tuple[float, float]:
    """Median seconds per token of (mask, advance) over `repeats` walks through `ids`."""
    mask_t, step_t = [], []
    for _ in range(repeats):
        state, m_sum, s_sum = new_state(), 0.0, 0.0
        for i in ids:
            t0 = time.perf_counter()
            allowed = mask(state)
            t1 = time.perf_counter()
            assert allowed[i], f"token {i} rejected by the grammar"
            step(state, i)
            t2 = time.perf_counter()
            m_sum, s_sum = m_sum + t1 - t0, s_sum + t2 - t1
        mask_t.append(m_sum / len(ids))
        step_t.append(s_sum / len(ids))
    return statistics.median(mask_t), statistics.median(step_t)


def bench_xgrammar(tok: Tokenizer, repeats: int) -> list[dict]:
    import xgrammar as xgr

    vocab = tok.vocab_size
    pieces = [b"" if i in tok.special_token_ids else p for i, p in enumerate(tok._pieces())]

    def setup() -> object:
        info = xgr.TokenizerInfo(pieces, xgr.VocabType.RAW, vocab_size=vocab, stop_token_ids=tok.stop_token_ids)
        return xgr.GrammarCompiler(info, max_threads=8, cache_enabled=False)

    setup_s = median_time(setup, repeats)
    compiler = setup()
    rows = []
    for name, compile_fn, doc in [
        ("json_schema", lambda: compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False), SCHEMA_DOC),
        ("json_object", lambda: compiler.compile_json_schema('{"type": "object"}', any_whitespace=False), OBJECT_DOC),
    ]:
        compile_s = median_time(compile_fn, repeats)
        compiled = compile_fn()
        bitmask = xgr.allocate_token_bitmask(1, vocab)

        def mask(m: object, bitmask: torch.Tensor = bitmask) -> torch.Tensor:
            m.fill_next_token_bitmask(bitmask)
            return unpack(bitmask, vocab)

        ids = tok.encode(doc)
        mask_s, step_s = walk(
            lambda c=compiled: xgr.GrammarMatcher(c), mask, lambda m, i: m.accept_token(i), ids, repeats
        )
        rows.append(
            dict(
                library="xgrammar",
                grammar=name,
                setup=setup_s,
                compile=compile_s,
                mask=mask_s,
                step=step_s,
                tokens=len(ids),
            )
        )
    return rows


def bench_outlines(tok: Tokenizer, repeats: int) -> list[dict]:
    import outlines_core as oc

    vocab = tok.vocab_size
    pieces = tok._pieces()

    def setup() -> object:
        by_piece: dict[bytes, list[int]] = {}
        for i, p in enumerate(pieces):
            if i not in tok.special_token_ids:
                by_piece.setdefault(p, []).append(i)
        # One eos id only: outlines-core's Vocabulary has no list of stop tokens.
        return oc.Vocabulary(tok.stop_token_ids[0], by_piece)

    setup_s = median_time(setup, repeats)
    voc = setup()
    rows = []
    for name, schema, doc in [("json_schema", SCHEMA, SCHEMA_DOC), ("json_object", {"type": "object"}, OBJECT_DOC)]:

        def compile_fn(schema: dict = schema) -> object:
            return oc.Index(oc.json_schema.build_regex_from_schema(json.dumps(schema)), voc)

        compile_s = median_time(compile_fn, max(1, repeats // 3) if name == "json_object" else repeats)
        index = compile_fn()
        bitmask = torch.zeros((vocab + 31) // 32, dtype=torch.int32)

        def mask(g: object, bitmask: torch.Tensor = bitmask) -> torch.Tensor:
            g.write_mask_into(bitmask.data_ptr(), bitmask.numel(), 4)
            return unpack(bitmask, vocab)

        ids = tok.encode(doc)
        mask_s, step_s = walk(
            lambda ix=index: oc.Guide(ix), mask, lambda g, i: g.advance(i, return_tokens=False), ids, repeats
        )
        rows.append(
            dict(
                library="outlines-core",
                grammar=name,
                setup=setup_s,
                compile=compile_s,
                mask=mask_s,
                step=step_s,
                tokens=len(ids),
            )
        )
    return rows


def bench_lmforge(tok: Tokenizer, repeats: int) -> list[dict]:
    rows = []
    for name, kw, doc in [
        ("json_schema", dict(json_schema=SCHEMA), SCHEMA_DOC),
        ("json_object", dict(json_object=True), OBJECT_DOC),
    ]:
        grammar = compile_grammar(tok, tok.vocab_size, **kw)
        fresh = median_time(grammar.constraint, 50)
        mask_s, step_s = walk(
            grammar.constraint, lambda c: c.allowed(), lambda c, i: c.advance(i), tok.encode(doc), repeats
        )
        rows.append(
            dict(
                library="lmforge (xgrammar)",
                grammar=name,
                setup=float("nan"),
                compile=fresh,
                mask=mask_s,
                step=step_s,
                tokens=len(tok.encode(doc)),
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[2048, 32000])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    print(f"CPU: {cpu()}")
    print(
        f"Python {platform.python_version()}, torch {torch.__version__}, xgrammar {version('xgrammar')}, "
        f"outlines-core {version('outlines-core')}"
    )
    texts = stdlib_texts()
    print(f"training text: {len(texts)} stdlib files, {sum(map(len, texts)) / 1e6:.1f} M characters\n")
    print("| vocab | library | grammar | vocab setup ms | compile ms | mask us/token | advance us/token | tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.vocab_sizes:
        tok = Tokenizer.train(texts, size, "llama3")
        rows = bench_xgrammar(tok, args.repeats) + bench_outlines(tok, args.repeats) + bench_lmforge(tok, args.repeats)
        for r in rows:
            setup = "-" if r["setup"] != r["setup"] else f"{r['setup'] * 1e3:.1f}"
            compile_ms = (
                f"{r['compile'] * 1e3:.3f} (new constraint)"
                if r["library"].startswith("lmforge")
                else f"{r['compile'] * 1e3:.1f}"
            )
            print(
                f"| {size} | {r['library']} | {r['grammar']} | {setup} | {compile_ms} | {r['mask'] * 1e6:.1f} | "
                f"{r['step'] * 1e6:.1f} | {r['tokens']} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
