"""Log-likelihood of continuations given contexts, batched, as lm-evaluation-harness defines it.

The token boundary: trailing whitespace of the context moves to the continuation, the pair is encoded as
one string, and the continuation's tokens are those past the context's own encoding (a split inside a word
then scores the tokens the whole string really has). Both encodings add the tokenizer's special prefix
(BOS for Llama 3), as lm-evaluation-harness's HuggingFace backend does. An empty context is replaced by a
prefix token (BOS, or EOS when there is none). Scoring runs on the decoding engine (lmforge.generate.engine) as
prompt log-probs: chunked, batched, with shared contexts reused through its prefix cache.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmforge.errors import LmforgeError
from lmforge.generate.engine import Engine, EngineConfig, RequestHandle
from lmforge.generate.options import GenerationOptions
from lmforge.model import Transformer
from lmforge.progress import Progress


@dataclass
class Score:
    logprob: float  # sum of log p(continuation token | everything before it)
    greedy: bool  # every continuation token is the argmax at its position
    num_tokens: int


def prefix_token_id(tokenizer: Any) -> int:
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise LmforgeError("the tokenizer has neither BOS nor EOS to start an empty context with.")
    return token


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Ids of `text` with the tokenizer's special prefix (BOS), unless the text already starts with it (e.g. a
    rendered chat prompt), as lm-evaluation-harness's HuggingFace backend does."""
    plain = tokenizer.encode(text)
    prefixed = tokenizer.encode(text, add_special_tokens=True)
    n = len(prefixed) - len(plain)
    return plain if n and plain[:n] == prefixed[:n] else prefixed


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) with lm-evaluation-harness's boundary rule (module docstring)."""
    if not continuation:
        raise LmforgeError("an empty continuation has no tokens to score.")
    if not context:
        return [prefix_token_id(tokenizer)], tokenizer.encode(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode_text(tokenizer, context + continuation)
    context_ids = encode_text(tokenizer, context)
    continuation_ids = whole[len(context_ids) :]
    if not continuation_ids:
        raise LmforgeError(f"the continuation {continuation!r} vanished into the context's tokens.")
    return context_ids, continuation_ids


@torch.inference_mode()
def score_tokens(
    model: Transformer,
    pairs: Sequence[tuple[list[int], list[int]]],
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool = False,
) -> list[Score]:
    """Scores of (context ids, continuation ids) pairs; contexts are cut from the left to fit max_length.

    Scored on the decoding engine (prompt log-probs, nothing generated), so the numbers are the serving
    path's. Pairs that share a context (the choices of one question) share its KV blocks: the first
    choice of every question goes first, and the others then start from its cached context blocks."""
    if batch_size <= 0:
        raise LmforgeError(f"batch_size must be positive, got {batch_size}.")
    max_length = max_length or model.config.max_position_embeddings
    model.eval()
    for _, cont in pairs:
        if len(cont) > max_length:
            raise LmforgeError(f"a continuation of {len(cont)} tokens exceeds max_length {max_length}.")
    rows = [(ctx + cont)[-(max_length + 1) :] for ctx, cont in pairs]  # the model reads all but the last
    firsts: dict[tuple[int, ...], int] = {}
    for i, (ctx, _) in enumerate(pairs):
        firsts.setdefault(tuple(ctx), i)
    waves = [sorted(set(firsts.values())), sorted(set(range(len(pairs))) - set(firsts.values()))]
    block = 16
    longest = max((len(r) for r in rows), default=1)
    config = EngineConfig(
        max_batch=batch_size,
        kv_blocks=(batch_size + 1) * math.ceil(longest / block) + len(firsts) * math.ceil(longest / block) + 1,
        block_size=block,
        prefill_chunk=max(512, batch_size * min(longest, 128)),
        max_waiting=max(len(pairs), 1),
    )
    engine = Engine(model, None, config)
    handles: list[RequestHandle | None] = [None] * len(pairs)
    options = GenerationOptions(max_new_tokens=1)
    try:
        with Progress(len(pairs), "score", unit="req", enabled=progress) as bar:
            for wave in waves:
                for i in sorted(wave, key=lambda i: -len(rows[i])):  # longest first, as lm-eval does
                    score_from = len(rows[i]) - len(pairs[i][1])
                    handles[i] = engine.submit(
                        rows[i], options, prompt_logprobs=1, score_from=score_from, score_only=True
                    )
                while engine.has_work():
                    before = engine.counters["finished_requests"]
                    engine.step()
                    bar.update(engine.counters["finished_requests"] - before)
    finally:
        engine.close()
    out = []
    for i, h in enumerate(handles):
        assert h is not None and h.prompt_logprobs is not None
        cont = pairs[i][1]
        lps = h.prompt_logprobs[-len(cont) :]
        tops = h.prompt_top_logprobs[-len(cont) :]
        greedy = all(next(iter(top)) == t for top, t in zip(tops, cont, strict=True))
        out.append(Score(float(sum(lps)), greedy, len(cont)))
    return out


def loglikelihood(
    model: Transformer,
    tokenizer: Any,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool = False,
) -> list[Score]:
    """Scores of (context, continuation) string pairs."""
    pairs = [encode_pair(tokenizer, ctx, cont) for ctx, cont in requests]
    return score_tokens(model, pairs, batch_size, max_length, progress)
