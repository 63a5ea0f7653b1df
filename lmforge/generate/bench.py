"""llama-bench style speed tests: ppN (prefill N tokens) and tgN (generate N tokens one at a time)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from functools import partial

import torch

from lmforge.errors import LmforgeError
from lmforge.generate.compiled import CompiledDecoder
from lmforge.generate.gemv import ParallelGemv
from lmforge.generate.kv_cache import KVCache
from lmforge.model import Transformer
from lmforge.options import option, validate


@dataclass(frozen=True)
class BenchConfig:
    prompt_tokens: int = option(512, "prefill test length (ppN)")
    gen_tokens: int = option(128, "decode test length (tgN)")
    repeats: int = option(3, "timed runs of each test (after one warm-up)")
    threads: int | None = option(None, "torch threads (default: torch's choice)")
    compile: bool = option(False, "decode through a torch.compile'd step (compiled once, before the warm-up)")

    def __post_init__(self) -> None:
        validate(self)
        if min(self.prompt_tokens, self.gen_tokens, self.repeats) <= 0 or (
            self.threads is not None and self.threads <= 0
        ):
            raise LmforgeError("prompt_tokens, gen_tokens, repeats and threads must be positive.")


@torch.inference_mode()  # lighter than no_grad: no autograd bookkeeping at all
def prefill_seconds(model: Transformer, n: int, generator: torch.Generator) -> float:
    p = next(model.parameters())
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=generator, device=p.device)
    cache = KVCache(model.config, 1, n, p.dtype, p.device)
    t0 = time.perf_counter()
    cache.feed(model, ids, logits_to_keep=1)
    return time.perf_counter() - t0


@torch.inference_mode()  # lighter than no_grad: no autograd bookkeeping at all
def decode_seconds(
    model: Transformer, n: int, generator: torch.Generator, compiled: CompiledDecoder | None = None
) -> float:
    """n forward passes of one token each over a growing cache, starting from an empty context; through
    `compiled` (a CompiledDecoder of the model holding at least n tokens) when given."""
    p = next(model.parameters())
    if compiled is not None:
        compiled.reset()
        token = torch.randint(0, model.config.vocab_size, (1,), generator=generator, device=p.device)
        t0 = time.perf_counter()
        for _ in range(n):
            token = compiled.step(token).argmax(-1)
        return time.perf_counter() - t0
    cache = KVCache(model.config, 1, n, p.dtype, p.device)
    token = torch.randint(0, model.config.vocab_size, (1, 1), generator=generator, device=p.device)
    with ParallelGemv(model):
        t0 = time.perf_counter()
        for _ in range(n):
            token = cache.feed(model, token)[:, -1:].argmax(-1)
        return time.perf_counter() - t0


def bench_model(model: Transformer, bench: BenchConfig | None = None) -> list[dict]:
    """Mean and standard deviation of tokens/s over `repeats` runs, after one warm-up run of each test."""
    bench = bench or BenchConfig()
    prompt_tokens, gen_tokens, repeats = bench.prompt_tokens, bench.gen_tokens, bench.repeats
    if bench.threads:
        torch.set_num_threads(bench.threads)
    model.eval()
    generator = torch.Generator().manual_seed(0)
    decode = partial(decode_seconds, compiled=CompiledDecoder(model, 1, gen_tokens) if bench.compile else None)
    rows = []
    for name, fn, n in (("pp", prefill_seconds, prompt_tokens), ("tg", decode, gen_tokens)):
        fn(model, min(n, 16), generator)  # warm-up
        rates = [n / fn(model, n, generator) for _ in range(repeats)]
        rows.append(
            {
                "test": f"{name}{n}",
                "mean": statistics.mean(rates),
                "std": statistics.stdev(rates) if len(rates) > 1 else 0.0,
                "runs": rates,
            }
        )
    return rows
