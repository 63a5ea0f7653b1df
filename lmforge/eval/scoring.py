"""Log-likelihood of continuations given contexts, batched, as lm-evaluation-harness defines it.

The token boundary: trailing whitespace of the context moves to the continuation, the pair is encoded as
one string, and the continuation's tokens are those past the context's own encoding (a split inside a word
then scores the tokens the whole string really has). An empty context is replaced by a prefix token (BOS,
or EOS when there is none). Batches are left-padded so that every row's continuation ends at the last
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


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) with lm-evaluation-harness's boundary rule (module docstring)."""
    if not continuation:
        raise LmforgeError("an empty continuation has no tokens to score.")
    if not context:
        return [prefix_token_id(tokenizer)], tokenizer.encode(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
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
    """Scores of (context ids, continuation ids) pairs; contexts are cut from the left to fit max_length."""
    if batch_size <= 0:
        raise LmforgeError(f"batch_size must be positive, got {batch_size}.")
    max_length = max_length or model.config.max_position_embeddings
    model.eval()
    # Longest first, as lm-evaluation-harness does: similar lengths share a batch, and memory peaks early.
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    results: list[Score | None] = [None] * len(pairs)
    device = next(model.parameters()).device
    with Progress(len(pairs), "score", unit="req", enabled=progress) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            rows, conts = [], []
            for i in idx:
                ctx, cont = pairs[i]
                if len(cont) > max_length:
                    raise LmforgeError(f"a continuation of {len(cont)} tokens exceeds max_length {max_length}.")
                rows.append((ctx + cont)[-(max_length + 1) :][:-1])  # the model predicts cont from here
                conts.append(cont)
            batch = left_pad(rows, device)
            keep = max(len(c) for c in conts)
            logits = model(
                batch.input_ids, positions_from_mask(batch.attention_mask), batch.attention_mask, logits_to_keep=keep
            )  # [B, C, V]
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            for row, (i, cont) in enumerate(zip(idx, conts, strict=True)):
                lp = logprobs[row, keep - len(cont) :]  # [len(cont), V]
                target = torch.tensor(cont, device=device)
                token_lp = lp.gather(-1, target[:, None]).squeeze(-1)
                greedy = bool((lp.argmax(-1) == target).all())
                results[i] = Score(float(token_lp.sum()), greedy, len(cont))
            bar.update(len(idx))
    return [r for r in results if r is not None]


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
