"""Log-likelihood of continuations given contexts, batched, as lm-evaluation-harness defines it.

The token boundary: trailing whitespace of the context moves to the continuation, the pair is encoded as
one string, and the continuation's tokens are those past the context's own encoding (a split inside a word
then scores the tokens the whole string really has). Both encodings add the tokenizer's special prefix
(BOS for Llama 3), as lm-evaluation-harness's HuggingFace backend does. An empty context is replaced by a
prefix token (BOS, or EOS when there is none). Batches are left-padded so that every row's continuation ends at the last
position: only the last max(continuation) positions go through the output projection.

Shape letters: B batch, L padded length, C continuation positions kept, V vocab.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmforge.errors import LmforgeError
from lmforge.generate.decode import left_pad, positions_from_mask
from lmforge.generate.kv_cache import KVCache
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

    Pairs that share a context (the choices of one question) share its forward pass: the context goes
    through the model once into a KV cache, which every continuation then extends."""
    if batch_size <= 0:
        raise LmforgeError(f"batch_size must be positive, got {batch_size}.")
    max_length = max_length or model.config.max_position_embeddings
    model.eval()
    for _, cont in pairs:
        if len(cont) > max_length:
            raise LmforgeError(f"a continuation of {len(cont)} tokens exceeds max_length {max_length}.")
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(pairs):
        groups.setdefault(tuple(ctx), []).append(i)
    shared = [
        idx
        for ctx, idx in groups.items()
        if len(idx) > 1 and len(ctx) > 1 and all(len(ctx) + len(pairs[i][1]) <= max_length + 1 for i in idx)
    ]
    alone = sorted(
        (i for idx in groups.values() if idx not in shared for i in idx),
        key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])),
    )  # longest first, as lm-eval does
    results: list[Score | None] = [None] * len(pairs)
    with Progress(len(pairs), "score", unit="req", enabled=progress) as bar:
        for idx in shared:
            for i, score in zip(idx, _score_shared_context(model, [pairs[i] for i in idx]), strict=True):
                results[i] = score
            bar.update(len(idx))
        for start in range(0, len(alone), batch_size):
            idx = alone[start : start + batch_size]
            for i, score in zip(idx, _score_batch(model, [pairs[i] for i in idx], max_length), strict=True):
                results[i] = score
            bar.update(len(idx))
    return [r for r in results if r is not None]


def _scores(logprobs: torch.Tensor, conts: list[list[int]], offsets: list[int]) -> list[Score]:
    """Per row: the log-probs [N, V] rows offsets[r] .. offsets[r] + len(cont) scored against cont."""
    out = []
    for row, (cont, offset) in enumerate(zip(conts, offsets, strict=True)):
        lp = logprobs[row, offset : offset + len(cont)]  # [len(cont), V]
        target = torch.tensor(cont, device=lp.device)
        token_lp = lp.gather(-1, target[:, None]).squeeze(-1)
        out.append(Score(float(token_lp.sum()), bool((lp.argmax(-1) == target).all()), len(cont)))
    return out


def _score_batch(model: Transformer, pairs: list[tuple[list[int], list[int]]], max_length: int) -> list[Score]:
    """Left-padded rows, so that every continuation ends at the last position."""
    device = next(model.parameters()).device
    rows = [(ctx + cont)[-(max_length + 1) :][:-1] for ctx, cont in pairs]  # the model predicts cont from here
    conts = [cont for _, cont in pairs]
    batch = left_pad(rows, device)
    keep = max(len(c) for c in conts)
    logits = model(
        batch.input_ids, positions_from_mask(batch.attention_mask), batch.attention_mask, logits_to_keep=keep
    )  # [B, C, V]
    return _scores(torch.log_softmax(logits.float(), dim=-1), conts, [keep - len(c) for c in conts])


def _score_shared_context(model: Transformer, pairs: list[tuple[list[int], list[int]]]) -> list[Score]:
    """One context, several continuations: the context minus its last token is run once into a cache that is
    then copied to one row per continuation; each row reads [last context token, cont[:-1]] (right-padded:
    causal attention keeps padding out of the real positions) and predicts cont."""
    p = next(model.parameters())
    context = pairs[0][0]
    conts = [cont for _, cont in pairs]
    width = max(len(c) for c in conts)
    cache = KVCache(model.config, 1, len(context) - 1 + width, p.dtype, p.device)
    model(torch.tensor([context[:-1]], device=p.device), cache=cache, logits_to_keep=1)
    cache.reorder(torch.zeros(len(pairs), dtype=torch.long, device=p.device))
    rows = torch.zeros(len(pairs), width, dtype=torch.long, device=p.device)  # [G, W]
    for r, cont in enumerate(conts):
        rows[r, : len(cont)] = torch.tensor([context[-1], *cont[:-1]])
    logits = model(rows, cache=cache)  # [G, W, V]
    return _scores(torch.log_softmax(logits.float(), dim=-1), conts, [0] * len(conts))


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
