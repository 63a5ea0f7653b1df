"""Logits processors: functions (input_ids, scores) -> scores, applied in transformers' order.

input_ids [B, S] holds each row's prompt and generated tokens so far; left padding is marked with a
negative id (PAD = -1), which every processor ignores, so a row gives the same result batched or alone.
scores [B, V] are fp32 logits (or log-probabilities in beam search).

Each processor is numerically identical to its counterpart in transformers' `generation/logits_process.py`
(same kept/removed positions, same values): where the result depends on floating-point order (top-p and
typical-p accumulate probabilities) or on how ties are broken, we use the same reduction order and the
same sort, which is what the parity tests in tests/test_processors.py check. Removed tokens get -inf.
No processor modifies its inputs.

Shape letters: B batch, S sequence so far, V vocab, N n-gram size, W number of n-gram windows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lmforge.errors import LmforgeError
from lmforge.generate.options import GenerationOptions

PAD = -1
LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NEG_INF = float("-inf")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise LmforgeError(message)


def _present(input_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Bool [B, V]: which vocabulary ids occur in each row. PAD (negative) ids and ids >= V are ignored."""
    # Everything that is not a scoreable token goes to a spare column V, dropped at the end.
    ids = input_ids.masked_fill(input_ids < 0, vocab).clamp(max=vocab)  # [B, S]
    seen = torch.zeros(input_ids.shape[0], vocab + 1, dtype=torch.bool, device=input_ids.device)
    return seen.scatter_(1, ids, True)[:, :vocab]


def _unsort(sorted_mask: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Undo a sort along the last dim: out[b, order[b, j]] = sorted_mask[b, j]."""
    return torch.empty_like(sorted_mask).scatter_(-1, order, sorted_mask)


@dataclass(frozen=True)
class RepetitionPenalty:
    """CTRL repetition penalty (Keskar et al. 2019, arXiv 1909.05858): every token id present in the row,
    prompt included, has its score divided by `penalty` if positive, multiplied by it if negative, once
    however often it occurs. penalty > 1 discourages repetition, < 1 encourages it."""

    penalty: float

    def __post_init__(self) -> None:
        _check(self.penalty > 0, f"repetition_penalty must be > 0 (1 is off), got {self.penalty}.")

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        seen = _present(input_ids, scores.shape[-1])  # [B, V]
        # transformers tests `score < 0`: a score of exactly 0 is divided, which leaves it 0 either way.
        penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(seen, penalised, scores)


@dataclass(frozen=True)
class NoRepeatNGram:
    """Forbid any token that would complete an n-gram (of `size` tokens) already present in the row.

    The n-grams are those of the row's real tokens: windows that touch a PAD are not n-grams, so a
    left-padded row bans exactly what the same row unpadded bans (nothing until it has `size` tokens).
    """

    size: int

    def __post_init__(self) -> None:
        _check(self.size > 0, f"no_repeat_ngram_size must be > 0 (0 is off), got {self.size}.")

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        n, length, vocab = self.size, input_ids.shape[-1], scores.shape[-1]
        if length < n:
            return scores
        # The next token completes the n-gram (last n-1 tokens, next). It is banned when some earlier
        # window of n tokens starts with those same n-1 tokens; the window's last token is the one banned.
        context = input_ids[:, length - (n - 1) :]  # [B, N-1]
        windows = input_ids.unfold(1, n, 1)  # [B, W, N], W = S - N + 1
        hit = (windows[..., :-1] == context[:, None, :]).all(-1)  # [B, W]
        # A window holding a PAD is not an n-gram of the row (if the context holds one, the row is shorter
        # than n, and every window holds one too).
        hit &= (windows >= 0).all(-1)
        banned_ids = torch.where(hit, windows[..., -1].clamp(max=vocab), vocab)  # misses -> spare column V
        banned = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
        banned.scatter_(1, banned_ids, True)
        return scores.masked_fill(banned[:, :vocab], NEG_INF)


@dataclass(frozen=True)
class Temperature:
    """Divide the logits by `temperature` (< 1 sharpens the distribution, > 1 flattens it)."""

    temperature: float

    def __post_init__(self) -> None:
        _check(
            self.temperature > 0, f"temperature must be > 0 to scale logits (0 means greedy), got {self.temperature}."
        )

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.temperature


@dataclass(frozen=True)
class TopK:
    """Keep the `k` highest scores (at least `min_tokens_to_keep`, at most V). Every token tied with the
    k-th score is kept too, so more than k tokens can survive (as in transformers)."""

    k: int
    min_tokens_to_keep: int = 1

    def __post_init__(self) -> None:
        _check(self.k > 0, f"top_k must be > 0 (0 is off), got {self.k}.")
        _check(self.min_tokens_to_keep >= 1, f"min_tokens_to_keep must be >= 1, got {self.min_tokens_to_keep}.")

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        k = min(max(self.k, self.min_tokens_to_keep), scores.shape[-1])
        kth_best = scores.topk(k, dim=-1).values[..., -1:]  # [B, 1]
        return scores.masked_fill(scores < kth_best, NEG_INF)


@dataclass(frozen=True)
class TopP:
    """Nucleus sampling (Holtzman et al. 2020, arXiv 1904.09751): keep the most likely tokens whose
    probabilities add up to at least `p`, and always at least `min_tokens_to_keep`.

    transformers' formulation, reproduced for identical results: sort ascending, accumulate the softmax
    from the least likely token up, and remove every token whose running sum is <= 1 - p (compared in
    fp32, so a tiny p such as 1e-9 leaves just the min_tokens_to_keep most likely). Unlike top-k, ties
    are broken by the sort order: of two equally likely tokens at the boundary, one can go.
    """

    p: float
    min_tokens_to_keep: int = 1

    def __post_init__(self) -> None:
        _check(0 < self.p <= 1, f"top_p must be in (0, 1], got {self.p}.")
        _check(self.min_tokens_to_keep >= 1, f"min_tokens_to_keep must be >= 1, got {self.min_tokens_to_keep}.")

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        ascending, order = torch.sort(scores, descending=False)  # [B, V]
        mass_up_to = ascending.softmax(-1).cumsum(-1)  # [B, V]: total probability of this token and all below
        drop = mass_up_to <= 1 - self.p
        drop[..., -self.min_tokens_to_keep :] = False  # the most likely ones are at the end
        return scores.masked_fill(_unsort(drop, order), NEG_INF)


@dataclass(frozen=True)
class MinP:
    """Min-p sampling (Nguyen et al. 2024, arXiv 2407.01082): remove tokens whose probability is below
    `p` times the probability of the most likely token; keep at least `min_tokens_to_keep`."""

    p: float
    min_tokens_to_keep: int = 1

    def __post_init__(self) -> None:
        _check(0 <= self.p <= 1, f"min_p must be in [0, 1], got {self.p}.")
        _check(self.min_tokens_to_keep >= 1, f"min_tokens_to_keep must be >= 1, got {self.min_tokens_to_keep}.")

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = scores.softmax(-1)  # [B, V]
        drop = probs < self.p * probs.amax(-1, keepdim=True)
        # Ties among the most likely are broken by topk on the probabilities, as transformers does.
        best = probs.topk(min(self.min_tokens_to_keep, probs.shape[-1]), dim=-1).indices
        drop.scatter_(-1, best, False)
        return scores.masked_fill(drop, NEG_INF)


@dataclass(frozen=True)
class TypicalP:
    """Locally typical sampling (Meister et al. 2023, arXiv 2202.00666): rank tokens by how far their
    surprisal -log p is from the entropy of the distribution, and keep the closest ones until their
    probabilities add up to `mass` (the token that crosses `mass` is kept, and so is every token as close
    to the entropy as it). The first `min_tokens_to_keep` in that ranking are always kept.
    """

    mass: float
    min_tokens_to_keep: int = 1

    def __post_init__(self) -> None:
        _check(0 < self.mass <= 1, f"typical_p must be in (0, 1], got {self.mass}.")
        _check(self.min_tokens_to_keep >= 1, f"min_tokens_to_keep must be >= 1, got {self.min_tokens_to_keep}.")

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        surprisal = -torch.log_softmax(scores, dim=-1)  # [B, V]
        probs = torch.exp(-surprisal)
        # Filtered tokens have p = 0 and surprisal inf: 0 * inf is NaN, and nansum drops it (0 contribution).
        entropy = (surprisal * probs).nansum(-1, keepdim=True)  # [B, 1]
        distance = (surprisal - entropy).abs()  # [B, V]
        ranked, order = torch.sort(distance, descending=False)
        mass_so_far = scores.gather(-1, order).softmax(-1).cumsum(-1)  # [B, V]
        # Position of the token whose running sum first reaches `mass` (the last one when none does).
        cut = (mass_so_far < self.mass).sum(-1, keepdim=True).clamp(max=scores.shape[-1] - 1)  # [B, 1]
        drop = ranked > ranked.gather(-1, cut)
        drop[..., : self.min_tokens_to_keep] = False
        return scores.masked_fill(_unsort(drop, order), NEG_INF)


def build_processors(options: GenerationOptions, min_tokens_to_keep: int = 1) -> list[LogitsProcessor]:
    """The processors `options` asks for, in transformers' order (penalties first, then sampling warpers).

    Only the processors that are on are returned: repetition_penalty != 1, no_repeat_ngram_size > 0, then,
    when sampling, temperature != 1, top_k > 0, top_p < 1, min_p > 0, typical_p < 1. `min_tokens_to_keep`
    applies to the filters; transformers uses 1 except in beam search (number of EOS ids + 1).
    """
    o = options
    processors: list[LogitsProcessor] = []
    if o.repetition_penalty != 1.0:
        processors.append(RepetitionPenalty(o.repetition_penalty))
    if o.no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGram(o.no_repeat_ngram_size))
    if o.do_sample:
        if o.temperature != 1.0:
            processors.append(Temperature(o.temperature))
        if o.top_k > 0:
            processors.append(TopK(o.top_k, min_tokens_to_keep))
        if o.top_p < 1.0:
            processors.append(TopP(o.top_p, min_tokens_to_keep))
        if o.min_p > 0.0:
            processors.append(MinP(o.min_p, min_tokens_to_keep))
        if o.typical_p < 1.0:
            processors.append(TypicalP(o.typical_p, min_tokens_to_keep))
    return processors


def apply_processors(processors: list[LogitsProcessor], input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    for process in processors:
        scores = process(input_ids, scores)
    return scores


def sample(scores: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row [B], drawn from softmax(scores [B, V]); tokens at -inf are never drawn.

    Reproducible: the same scores and a generator seeded the same way (on the same device) give the same
    tokens, because the draw uses no randomness but `generator`'s. generator=None draws from torch's
    global generator.
    """
    probs = scores.softmax(-1)  # [B, V]
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
