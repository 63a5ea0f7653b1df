"""GLM's autoregressive blank infilling (Du et al., ACL 2022, arXiv 2103.10360): samples, batches, objective.

A text x1..xn is corrupted by blanking spans (REFERENCE.md section 4):

    Part A   the text with every span replaced by ONE blank token ([MASK], [sMASK] or [gMASK])
    Part B   the spans in a random order, each fed as `<sop> s1..sl` with targets `s1..sl <eop>`

and the model is trained on Part B only, with Part A attended bidirectionally and Part B causally:
allowed[i, j] = (j < len(A)) or (j <= i). 2D positions tell the model where a span goes: position #1 is
the index in Part A (a Part-B token takes its blank's), position #2 is 0 in Part A and 1..l+1 inside a
span (rope.py turns the pair into 2D RoPE).

Three ways to choose the spans (the paper's three objectives):
    token      Poisson(3) lengths truncated to 1..39, drawn until >= 15% of the tokens are covered, placed
               at random, non-overlapping and non-adjacent; blanks are [MASK]
    sentence   whole sentences, chosen in random order (never two neighbours) until >= 15% are covered;
               blanks are [sMASK]. A token ends a sentence when its text, without trailing spaces/tabs,
               ends in '.', '!', '?' or a newline (`sentence_end_table`). A text with fewer than two
               sentences, or whose non-neighbouring sentences cannot cover 15%, falls back to `token`.
    document   one span at the end of the text, 50-100% of its length (uniform); the blank is [gMASK]
    mixed      per sample: token 60%, sentence 20%, document 20% (MIXED_WEIGHTS)

`GlmLoader` turns token shards into padded batches of such samples with an exactly resumable state, and
`glm_objective` is the loss (the causal-LM loss: labels are aligned with the inputs).

Shape letters: B batch, T padded sample length, L one sample's length, n text tokens, k spans.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmforge.data.shards import TokenShards
from lmforge.errors import LmforgeError, suggest
from lmforge.model import Transformer
from lmforge.train.config import GLM_VARIANTS
from lmforge.train.objectives import IGNORE_INDEX, LossOutput, causal_lm

MASK_RATIO = 0.15  # share of the tokens the token- and sentence-level spans cover (at least)
POISSON_MEAN = 3.0  # span length ~ Poisson(3) ...
MAX_SPAN = 39  # ... truncated to 1..39
DOCUMENT_RANGE = (0.5, 1.0)  # document-level span: this share of the text, uniformly
VARIANTS = GLM_VARIANTS
MIXED_WEIGHTS = {"token": 0.6, "sentence": 0.2, "document": 0.2}
SENTENCE_END_CHARS = (".", "!", "?", "\n")
STATE_VERSION = 1
# Settings that fix the samples; resuming with others is not a resume.
_CHECKED = ("seed", "batch_size", "seq_len", "variant", "shuffle", "num_tokens", "num_units")
_GLM_TOKENS = {"mask": "[MASK]", "gmask": "[gMASK]", "smask": "[sMASK]", "sop": "<sop>", "eop": "<eop>"}

Span = tuple[int, int]  # [start, end) in the text


@dataclass(frozen=True)
class GlmTokens:
    """The ids of GLM's special tokens (the glm4 chat format's), and the id padding uses."""

    mask: int
    gmask: int
    smask: int
    sop: int
    eop: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> GlmTokens:
        """Look the tokens up; a clear error when the tokenizer lacks any of them."""
        ids = {name: tokenizer.token_to_id(text) for name, text in _GLM_TOKENS.items()}
        missing = [_GLM_TOKENS[name] for name, i in ids.items() if i is None]
        if missing:
            raise LmforgeError(
                f"the tokenizer lacks {', '.join(missing)}, which the GLM objective needs; train one with "
                "`lmforge tokenizer train ... --chat-format glm4` and prepare the data with it."
            )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(**ids, pad=pad if pad is not None else ids["eop"])

    @property
    def blanks(self) -> tuple[int, int, int]:
        return (self.mask, self.smask, self.gmask)


@dataclass
class GlmSample:
    """One corrupted text: inputs, labels aligned with them (label i is the target at position i),
    2D positions [L, 2], and where Part B starts."""

    input_ids: np.ndarray  # [L] int64
    labels: np.ndarray  # [L] int64, IGNORE_INDEX on Part A
    position_ids: np.ndarray  # [L, 2] int64: (#1, #2)
    part_a_len: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def attention_mask(self) -> np.ndarray:
        """[L, L] bool, allowed[i, j] = (j < len(A)) or (j <= i)."""
        n = len(self)
        j = np.arange(n)
        return (j[None, :] < self.part_a_len) | (j[None, :] <= j[:, None])


# --- building a sample ----------------------------------------------------------------------------------
def build_sample(
    tokens: Sequence[int],
    spans: Sequence[Span],
    order: Sequence[int],
    glm: GlmTokens,
    blank: int | None = None,
    first_position: int = 0,
) -> GlmSample:
    """The sample for `tokens` with `spans` (sorted, non-overlapping [start, end)) blanked and put in
    Part B in the given `order` (a permutation of range(len(spans))). `blank` is the token each span
    becomes in Part A (default [MASK]); position #1 counts from `first_position` (the paper's figure
    counts from 1)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    n, k = len(tokens), len(spans)
    blank = glm.mask if blank is None else blank
    if sorted(int(i) for i in order) != list(range(k)):
        raise LmforgeError(f"span order {list(order)} is not a permutation of 0..{k - 1}.")
    prev_end = 0
    for s, e in spans:
        if not (prev_end <= s < e <= n):
            raise LmforgeError(f"spans {list(spans)} must be sorted, non-empty, non-overlapping and inside 0..{n}.")
        prev_end = e
    # Part A: the text with each span replaced by the blank; remember where each blank landed.
    pieces: list[np.ndarray] = []
    blank_at: list[int] = []
    cursor = length = 0
    for s, e in spans:
        pieces.append(tokens[cursor:s])
        length += s - cursor
        blank_at.append(length)
        pieces.append(np.array([blank], dtype=np.int64))
        length += 1
        cursor = e
    pieces.append(tokens[cursor:])
    part_a = np.concatenate(pieces)
    a = len(part_a)
    inputs, labels, pos1, pos2 = [part_a], [np.full(a, IGNORE_INDEX)], [np.arange(a)], [np.zeros(a, dtype=np.int64)]
    # Part B: `<sop> s1..sl` -> `s1..sl <eop>`, at the blank's position #1, position #2 = 1..l+1.
    for idx in order:
        s, e = spans[int(idx)]
        span = tokens[s:e]
        inputs.append(np.concatenate([[glm.sop], span]))
        labels.append(np.concatenate([span, [glm.eop]]))
        pos1.append(np.full(e - s + 1, blank_at[int(idx)]))
        pos2.append(np.arange(1, e - s + 2))
    positions = np.stack([np.concatenate(pos1) + first_position, np.concatenate(pos2)], axis=-1)
    return GlmSample(
        np.concatenate(inputs).astype(np.int64), np.concatenate(labels).astype(np.int64), positions.astype(np.int64), a
    )


# --- choosing spans -------------------------------------------------------------------------------------
def _span_length(rng: np.random.Generator, longest: int) -> int:
    """Poisson(3) conditioned on 1..longest (redrawn until inside: a truncated distribution, not a clip)."""
    while True:
        x = int(rng.poisson(POISSON_MEAN))
        if 1 <= x <= longest:
            return x


def sample_spans(n: int, rng: np.random.Generator, ratio: float = MASK_RATIO, max_length: int = MAX_SPAN) -> list[Span]:
    """Token-level spans for a text of n >= 2 tokens, sorted by start.

    Lengths ~ Poisson(3) truncated to 1..min(max_length, n-1) are drawn until they cover >= ratio*n
    tokens; the spans are then placed uniformly at random among the placements that keep them
    non-overlapping and non-adjacent (at least one kept token between two spans), and at least one token
    of the text is never blanked. A draw whose spans cannot be placed so is discarded and redrawn."""
    if n < 2:
        raise LmforgeError(f"a text needs at least 2 tokens to blank a span out of it, got {n}.")
    longest = min(max_length, n - 1)
    need = ratio * n - 1e-9  # tolerance: 0.15 * n in floating point may land a hair above an integer
    for _ in range(10_000):
        lengths: list[int] = []
        while sum(lengths) < need:
            lengths.append(_span_length(rng, longest))
        k = len(lengths)
        # k spans need k-1 separators; the loose tokens left move freely. (One span is at most n-1 long,
        # so some token always stays.)
        free = n - sum(lengths) - (k - 1)
        if free < 0:
            continue
        # Shuffled: the last length (the one that crossed the threshold) must not always go last.
        lengths = [lengths[i] for i in rng.permutation(k).tolist()]
        # Stars and bars: k span blocks among `free` loose tokens, every arrangement equally likely. The
        # block in slot s_i (sorted) has s_i - i loose tokens, i separators and the earlier spans before it.
        slots = np.sort(rng.choice(free + k, size=k, replace=False)).tolist()
        spans, before = [], 0
        for slot, length in zip(slots, lengths, strict=True):
            spans.append((slot + before, slot + before + length))
            before += length
        return spans
    raise LmforgeError(f"could not place spans covering {ratio:.0%} of a {n}-token text.")  # pragma: no cover


def sentence_end_table(tokenizer: Any) -> np.ndarray:
    """bool [vocab_size]: the tokens that end a sentence (their text, without trailing spaces and tabs,
    ends in '.', '!', '?' or a newline). Special tokens never do."""
    table = np.zeros(tokenizer.vocab_size, dtype=bool)
    special = set(getattr(tokenizer, "special_token_ids", ()))
    for i in range(tokenizer.vocab_size):
        if i in special:
            continue
        text = tokenizer.decode([i]).rstrip(" \t")
        table[i] = text.endswith(SENTENCE_END_CHARS)
    return table


def sentences(tokens: np.ndarray, ends: np.ndarray) -> list[Span]:
    """[start, end) of each sentence of the text; a trailing piece without an end is a sentence too."""
    is_end = ends[np.asarray(tokens, dtype=np.int64)]
    stops = (np.flatnonzero(is_end) + 1).tolist()
    if not stops or stops[-1] != len(tokens):
        stops.append(len(tokens))
    starts = [0, *stops[:-1]]
    return list(zip(starts, stops, strict=True))


def sample_sentence_spans(
    tokens: np.ndarray, ends: np.ndarray, rng: np.random.Generator, ratio: float = MASK_RATIO
) -> list[Span] | None:
    """Whole sentences, visited in random order and taken unless a neighbour is already taken, until
    >= ratio of the tokens are covered; sorted. None when the text has fewer than two sentences or the
    coverage is not reached (the caller falls back to token-level spans)."""
    sents = sentences(tokens, ends)
    if len(sents) < 2:
        return None
    taken = np.zeros(len(sents) + 2, dtype=bool)  # padded by one on each side: neighbours of the ends
    covered = 0
    for i in rng.permutation(len(sents)).tolist():
        if taken[i] or taken[i + 2]:
            continue
        taken[i + 1] = True
        covered += sents[i][1] - sents[i][0]
        if covered >= ratio * len(tokens):
            return [sents[j] for j in np.flatnonzero(taken[1:-1]).tolist()]
    return None


def document_span(n: int, rng: np.random.Generator) -> Span:
    """One span at the end of the text, of a uniform length between 50% and 100% of it."""
    low = max(1, math.ceil(DOCUMENT_RANGE[0] * n))
    length = int(rng.integers(low, n + 1))
    return (n - length, n)


def _unknown_variant(variant: str) -> LmforgeError:
    known = ", ".join(VARIANTS)
    return LmforgeError(f"unknown GLM variant {variant!r}; use one of {known}." + suggest(variant, VARIANTS))


def make_sample(
    tokens: Sequence[int],
    glm: GlmTokens,
    rng: np.random.Generator,
    variant: str = "token",
    sentence_ends: np.ndarray | None = None,
) -> GlmSample:
    """A random GLM sample of `tokens` (n >= 2) for `variant` (token, sentence, document or mixed)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if variant == "mixed":
        names = list(MIXED_WEIGHTS)
        variant = names[int(rng.choice(len(names), p=list(MIXED_WEIGHTS.values())))]
    if variant == "document":
        spans, blank = [document_span(len(tokens), rng)], glm.gmask
    elif variant == "sentence":
        if sentence_ends is None:
            raise LmforgeError("the sentence-level variant needs sentence_ends (see sentence_end_table).")
        found = sample_sentence_spans(tokens, sentence_ends, rng)
        spans, blank = (found, glm.smask) if found is not None else (sample_spans(len(tokens), rng), glm.mask)
    elif variant == "token":
        spans, blank = sample_spans(len(tokens), rng), glm.mask
    else:
        raise _unknown_variant(variant)
    return build_sample(tokens, spans, rng.permutation(len(spans)).tolist(), glm, blank)


def max_text_tokens(seq_len: int, variant: str) -> int:
    """The longest text whose sample always fits in seq_len: a sample has n + 2k tokens (k spans), and the
    token and sentence spans stop once they cover MASK_RATIO, so k <= ceil(MASK_RATIO * n)."""
    if variant == "document":
        return seq_len - 2
    n = seq_len
    while n > 0 and n + 2 * math.ceil(MASK_RATIO * n) > seq_len:
        n -= 1
    return n


# --- batches --------------------------------------------------------------------------------------------
def collate(samples: Sequence[GlmSample], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest sample: input_ids, labels (IGNORE_INDEX on padding) [B, T], position_ids
    [B, T, 2] (0 on padding) and the boolean attention_mask [B, 1, T, T]. A padding row attends only to
    itself (a row with nothing to attend to would make attention NaN)."""
    B, T = len(samples), max(len(s) for s in samples)
    ids = np.full((B, T), pad_id, dtype=np.int64)
    labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros((B, T, 2), dtype=np.int64)
    mask = np.zeros((B, 1, T, T), dtype=bool)
    mask[:, 0, np.arange(T), np.arange(T)] = True
    for b, s in enumerate(samples):
        n = len(s)
        ids[b, :n], labels[b, :n], positions[b, :n] = s.input_ids, s.labels, s.position_ids
        mask[b, 0, :n, :n] = s.attention_mask()
    return {
        "input_ids": torch.from_numpy(ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(positions),
        "attention_mask": torch.from_numpy(mask),
    }


def text_units(shards: TokenShards, max_tokens: int, min_tokens: int = 2, block: int = 1 << 24) -> np.ndarray:
    """[U, 2] (start, length) of the texts the samples are made of: the documents of the token stream
    (separated by EOS, which is left out), each long one cut into near-equal pieces of <= max_tokens.
    Pieces shorter than `min_tokens` are dropped."""
    eos_at: list[np.ndarray] = []
    for start in range(0, shards.num_tokens, block):
        chunk = shards.read(start, min(block, shards.num_tokens - start))
        eos_at.append(np.flatnonzero(chunk == shards.eos_token_id) + start)
    ends = np.concatenate([*eos_at, np.array([], dtype=np.int64)])
    starts = np.concatenate([[0], ends + 1])
    stops = np.concatenate([ends, [shards.num_tokens]])
    units: list[tuple[int, int]] = []
    for s, e in zip(starts.tolist(), stops.tolist(), strict=True):
        m = e - s
        if m < min_tokens:
            continue
        pieces = -(-m // max_tokens)
        cuts = [s + m * i // pieces for i in range(pieces + 1)]
        units.extend((a, b - a) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b - a >= min_tokens)
    return np.array(units, dtype=np.int64).reshape(-1, 2)


class GlmLoader:
    """Infinite batches of GLM samples from token shards; `state_dict()` / `load_state_dict()` resume exactly.

    Each text unit (see `text_units`: documents, long ones cut to fit seq_len) becomes one sample. Each
    epoch visits every unit once, in the order `np.random.default_rng((seed, epoch)).permutation` (stream
    order without shuffle); the spans come from one numpy Generator whose state is part of the loader
    state. Batches are padded to their longest sample (see `collate`) and never exceed seq_len.
    """

    def __init__(
        self,
        shards: TokenShards,
        glm: GlmTokens,
        batch_size: int,
        seq_len: int,
        *,
        variant: str = "token",
        seed: int = 0,
        shuffle: bool = True,
        sentence_ends: np.ndarray | None = None,
    ) -> None:
        if variant not in VARIANTS:
            raise _unknown_variant(variant)
        if batch_size < 1:
            raise LmforgeError(f"batch_size must be positive, got {batch_size}.")
        if variant in ("sentence", "mixed") and sentence_ends is None:
            raise LmforgeError(f"the {variant!r} GLM variant needs sentence_ends (see sentence_end_table).")
        max_text = max_text_tokens(seq_len, "token" if variant == "mixed" else variant)
        if max_text < 2:
            raise LmforgeError(f"seq_len {seq_len} is too short for GLM samples; use seq_len >= 8.")
        self.shards, self.glm, self.variant = shards, glm, variant
        self.batch_size, self.seq_len, self.seed, self.shuffle = batch_size, seq_len, seed, shuffle
        self.sentence_ends = sentence_ends
        self.units = text_units(shards, max_text)
        if len(self.units) == 0:
            raise LmforgeError(
                f"split {shards.split!r} of {shards.data_dir} has no document of 2 or more tokens to make GLM "
                "samples of; prepare more text."
            )
        self.epoch = 0
        self.position = 0
        # A stream of its own (spawn key "GLM"), independent of the (seed, epoch) orders.
        self.rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0x474C4D,)))
        self._order: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        """Unit indices of `epoch`, in the order they are served."""
        if self._order is None or self._order[0] != epoch:
            n = len(self.units)
            perm = np.random.default_rng((self.seed, epoch)).permutation(n) if self.shuffle else np.arange(n)
            self._order = (epoch, perm)
        return self._order[1]

    def next_units(self, count: int) -> np.ndarray:
        """The indices of the next `count` units (running on across epoch ends); advances the position."""
        parts: list[np.ndarray] = []
        while count:
            take = min(count, len(self.units) - self.position)
            parts.append(self.order(self.epoch)[self.position : self.position + take])
            self.position += take
            count -= take
            if self.position == len(self.units):
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(parts)

    def batch(self, units: np.ndarray) -> dict[str, torch.Tensor]:
        samples = []
        for u in units.tolist():
            start, length = self.units[u].tolist()
            tokens = self.shards.read(start, length)
            samples.append(make_sample(tokens, self.glm, self.rng, self.variant, self.sentence_ends))
        return collate(samples, self.glm.pad)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.batch(self.next_units(self.batch_size))

    def one_epoch(self) -> Iterator[dict[str, torch.Tensor]]:
        """Every unit once from the current position to the end of the epoch (the last batch may be
        smaller). For evaluation: a loader built with shuffle=False gives the same batches every time."""
        epoch = self.epoch
        while self.epoch == epoch:
            yield self.batch(self.next_units(min(self.batch_size, len(self.units) - self.position)))

    def state_dict(self) -> dict[str, Any]:
        """Plain values (torch.save-friendly, weights_only loadable): position, settings and RNG state."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "variant": self.variant,
            "shuffle": self.shuffle,
            "num_tokens": self.shards.num_tokens,
            "num_units": len(self.units),
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was saved; raises LmforgeError if the settings or data differ."""
        missing = [k for k in ("epoch", "position", "rng", *_CHECKED) if k not in state]
        if missing:
            raise LmforgeError(f"data loader state lacks {', '.join(missing)}; it is not a GlmLoader state.")
        mine = self.state_dict()
        diffs = [f"{k} was {state[k]!r}, now {mine[k]!r}" for k in _CHECKED if state[k] != mine[k]]
        if diffs:
            raise LmforgeError(
                f"cannot resume the GLM data order: {'; '.join(diffs)}. Resume with the same data and settings "
                "(objective, glm_variant, seed, batch_size, seq_len)."
            )
        if not 0 <= int(state["position"]) < len(self.units) or int(state["epoch"]) < 0:
            raise LmforgeError(f"data loader state has epoch {state['epoch']}, position {state['position']}: corrupt.")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.rng.bit_generator.state = state["rng"]


# --- objective ------------------------------------------------------------------------------------------
def glm_objective(model: Transformer, batch: dict[str, torch.Tensor]) -> LossOutput:
    """Cross-entropy on Part B. A GLM batch's labels are already aligned with its inputs and carry
    IGNORE_INDEX on Part A and padding; 2D positions and the [B, 1, T, T] mask go to the model as given,
    so this is exactly `causal_lm`, named for what it trains."""
    return causal_lm(model, batch)
