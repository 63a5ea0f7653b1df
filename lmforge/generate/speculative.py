"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023), greedy form.

A small draft model proposes k tokens one at a time; the target model scores all of them in ONE forward
pass over k+1 positions. The longest prefix on which the draft agrees with the target's argmax is kept,
followed by the target's own token at the first disagreement (or a bonus token when all k agree). Every
kept token is the target's greedy choice, so the output equals greedy decoding with the target alone,
while the target runs roughly once per (accepted + 1) tokens.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmforge.errors import LmforgeError
from lmforge.generate.gemv import ParallelGemv
from lmforge.generate.kv_cache import KVCache
from lmforge.model import Transformer


@dataclass
class SpeculativeResult:
    tokens: list[int]  # generated ids, without the prompt
    drafted: int  # draft tokens proposed
    accepted: int  # draft tokens the target agreed with
    target_forwards: int
    seconds: float

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def _cache(model: Transformer, length: int) -> KVCache:
    p = next(model.parameters())
    return KVCache(model.config, 1, length, p.dtype, p.device)


@torch.inference_mode()  # lighter than no_grad: no autograd bookkeeping at all
def speculative_generate(
    target: Transformer,
    draft: Transformer,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    num_draft_tokens: int = 4,
    eos_token_id: int | Sequence[int] | None = None,
) -> SpeculativeResult:
    """Greedy generation with `target`, accelerated by `draft` (which must share the tokenizer)."""
    if target.config.vocab_size != draft.config.vocab_size:
        raise LmforgeError(
            f"the draft model's vocabulary ({draft.config.vocab_size}) differs from the target's "
            f"({target.config.vocab_size}); they must share a tokenizer."
        )
    if not prompt_ids:
        raise LmforgeError("empty prompt: give at least one token.")
    if max_new_tokens <= 0 or num_draft_tokens <= 0:
        raise LmforgeError("max_new_tokens and num_draft_tokens must be positive.")
    if eos_token_id is None:
        eos_token_id = target.config.usable_eos_token_ids
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    device = next(target.parameters()).device
    total = len(prompt_ids) + max_new_tokens + num_draft_tokens + 1
    limit = min(target.config.max_position_embeddings, draft.config.max_position_embeddings)
    if len(prompt_ids) + max_new_tokens > limit:
        raise LmforgeError(f"prompt + max_new_tokens exceeds the context of {limit} tokens.")
    t_cache, d_cache = _cache(target, total), _cache(draft, total)
    start = time.perf_counter()

    prompt = torch.tensor([list(prompt_ids)], device=device)
    # The target produces the first token; the draft only needs the prompt in its cache.
    last = int(t_cache.feed(target, prompt, logits_to_keep=1)[0, -1].argmax())
    if prompt.shape[1] > 1:
        d_cache.feed(draft, prompt[:, :-1])
    d_pending = [int(prompt[0, -1])]  # tokens the draft still has to read
    out = [last]
    drafted = accepted = 0
    forwards = 1
    with ParallelGemv(target), ParallelGemv(draft):  # few rows per forward: matrix-vector products
        while len(out) < max_new_tokens and last not in eos:
            # Draft k tokens greedily (it first reads what it has not seen yet).
            k = min(num_draft_tokens, max_new_tokens - len(out))
            proposal: list[int] = []
            feed = d_pending + [last]
            for _ in range(k):
                logits = d_cache.feed(draft, torch.tensor([feed], device=device), logits_to_keep=1)
                feed = [int(logits[0, -1].argmax())]
                proposal.append(feed[0])
            drafted += k
            # The target checks [last, d1..dk] at once: prediction i is its choice after d_i.
            t_start = t_cache.length
            check = t_cache.feed(target, torch.tensor([[last, *proposal]], device=device))[0].argmax(-1).tolist()
            forwards += 1
            n = 0
            while n < k and proposal[n] == check[n]:
                n += 1
            accepted += n
            new = proposal[:n] + [check[n]]
            # Keep the target's cache for [last, d1..dn]; the draft has read [.., last, d1..d_{k-1}].
            t_cache.crop(t_start + 1 + n)
            d_cache.crop(t_start + 1 + min(n, k - 1))
            d_pending = [proposal[-1]] if n == k else []  # the draft never read its own last proposal
            for token in new:
                out.append(token)
                if token in eos or len(out) >= max_new_tokens:
                    break
            last = out[-1]
    return SpeculativeResult(out[:max_new_tokens], drafted, accepted, forwards, time.perf_counter() - start)
