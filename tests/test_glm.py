"""GLM blank infilling: the paper's worked example, span sampling, variants, 2D RoPE, batches and exact
resume, training with --objective glm, and infilling (library and CLI) with a tiny model trained here."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge import LmforgeError, ModelConfig, Transformer
from lmforge.cli import main as cli_main
from lmforge.data import TokenShards, prepare
from lmforge.generate.infill import infill, infill_ids, infill_with_spans
from lmforge.generate.kv_cache import KVCache
from lmforge.loading import load_model_and_tokenizer
from lmforge.model import build_attention_mask
from lmforge.rope import RotaryEmbedding, apply_rope
from lmforge.tokenizer import Tokenizer
from lmforge.train.config import TrainConfig
from lmforge.train.glm import (
    MAX_SPAN,
    GlmLoader,
    GlmSample,
    GlmTokens,
    build_sample,
    collate,
    make_sample,
    max_text_tokens,
    sample_sentence_spans,
    sample_spans,
    sentence_end_table,
    sentences,
)
from lmforge.train.objectives import IGNORE_INDEX, causal_lm
from lmforge.train.pretrain import pretrain

# Ids of a made-up vocabulary for the pure-function tests: text tokens are < 100.
G = GlmTokens(mask=100, gmask=101, smask=102, sop=103, eop=104, pad=0)
COLORS = ["red", "orange", "yellow", "green", "blue", "indigo", "violet", "black", "white", "gray", "brown", "pink"]
SMALL = dict(vocab_size=110, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # These models are tiny: a second thread only adds synchronisation (and on a shared 2-core machine, much more).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def check_sample(
    s: GlmSample, tokens: np.ndarray, spans: list[tuple[int, int]], blank: int, glm: GlmTokens = G
) -> None:
    """Everything a valid sample must satisfy, from its tokens and spans (whatever the order)."""
    n, k = len(tokens), len(spans)
    a = s.part_a_len
    assert len(s) == n + 2 * k and a == n - sum(e - b for b, e in spans) + k
    part_a = s.input_ids[:a]
    assert (s.labels[:a] == IGNORE_INDEX).all() and (s.position_ids[:a, 0] == np.arange(a)).all()
    assert (s.position_ids[:a, 1] == 0).all()
    blanks = np.flatnonzero(part_a == blank)
    assert len(blanks) == k
    # Part B: k runs `<sop> span`, each at its blank's position #1, position #2 = 1..l+1, targets `span <eop>`.
    starts = a + np.flatnonzero(s.input_ids[a:] == glm.sop)
    assert len(starts) == k and starts[0] == a
    filled = {}
    for b0, b1 in zip(starts, [*starts[1:], len(s)], strict=True):
        span = s.input_ids[b0 + 1 : b1]
        assert (s.labels[b0:b1] == np.append(span, glm.eop)).all()
        assert (s.position_ids[b0:b1, 1] == np.arange(1, b1 - b0 + 1)).all()
        assert len(set(s.position_ids[b0:b1, 0].tolist())) == 1
        filled[int(s.position_ids[b0, 0])] = span
    assert sorted(filled) == blanks.tolist()
    # Putting the spans back into Part A gives the text back.
    rebuilt = np.concatenate([filled[i] if i in filled else part_a[i : i + 1] for i in range(a)])
    assert (rebuilt == tokens).all()
    mask = s.attention_mask()
    i, j = np.meshgrid(np.arange(len(s)), np.arange(len(s)), indexing="ij")
    assert (mask == ((j < a) | (j <= i))).all()


# --- the paper's worked example (REFERENCE.md section 4) ------------------------------------------------
def test_worked_example_token_for_token():
    x = [11, 12, 13, 14, 15, 16]  # x1..x6
    # spans {x3} and {x5, x6}; Part B in the order x5 x6, then x3; the figure counts positions from 1
    s = build_sample(x, [(2, 3), (4, 6)], [1, 0], G, first_position=1)
    M, S, E, _ = G.mask, G.sop, G.eop, IGNORE_INDEX
    assert s.input_ids.tolist() == [11, 12, M, 14, M, S, 15, 16, S, 13]
    assert s.labels.tolist() == [_, _, _, _, _, 15, 16, E, 13, E]
    assert s.position_ids[:, 0].tolist() == [1, 2, 3, 4, 5, 5, 5, 5, 3, 3]
    assert s.position_ids[:, 1].tolist() == [0, 0, 0, 0, 0, 1, 2, 3, 1, 2]
    assert s.part_a_len == 5
    expected = np.array(
        [
            [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        ],
        dtype=bool,
    )
    assert (s.attention_mask() == expected).all()
    # lmforge's own positions count from 0, like every other position in the library.
    zero = build_sample(x, [(2, 3), (4, 6)], [1, 0], G)
    assert (zero.position_ids[:, 0] == s.position_ids[:, 0] - 1).all()
    assert (zero.position_ids[:, 1] == s.position_ids[:, 1]).all()
    check_sample(zero, np.array(x), [(2, 3), (4, 6)], G.mask)


def test_build_sample_rejects_bad_spans():
    with pytest.raises(LmforgeError, match="sorted"):
        build_sample([1, 2, 3, 4], [(2, 3), (1, 2)], [0, 1], G)
    with pytest.raises(LmforgeError, match="permutation"):
        build_sample([1, 2, 3, 4], [(1, 2)], [1], G)


# --- span sampling --------------------------------------------------------------------------------------
def test_span_sampling_constraints_and_statistics():
    rng = np.random.default_rng(0)
    lengths: list[int] = []
    covered_at = np.zeros(60, dtype=int)
    for trial in range(3000):
        n = 60 if trial < 1500 else int(rng.integers(2, 400))
        spans = sample_spans(n, rng)
        total = sum(e - s for s, e in spans)
        assert total >= 0.15 * n and total < n  # coverage, and never the whole text
        for (_, e0), (s1, _) in zip(spans, spans[1:], strict=False):
            assert e0 < s1  # sorted, non-overlapping AND non-adjacent: a kept token between spans
        assert spans[0][0] >= 0 and spans[-1][1] <= n
        assert all(1 <= e - s <= MAX_SPAN for s, e in spans)
        lengths += [e - s for s, e in spans]
        if n == 60:
            for s, e in spans:
                covered_at[s:e] += 1
    # Poisson(3) conditioned on 1..39: P(1) = 3e^-3 / (1 - e^-3), mean 3 / (1 - e^-3).
    p0 = math.exp(-3)
    lengths_arr = np.array(lengths)
    assert abs(lengths_arr.mean() - 3 / (1 - p0)) < 0.1
    assert abs((lengths_arr == 1).mean() - 3 * p0 / (1 - p0)) < 0.02
    # Placed at random: every position is blanked sometimes, the ends as well as the middle.
    assert covered_at.min() > 0.3 * covered_at.mean()
    # A cap below the usual 39 is honoured (the truncation is by redrawing, so lengths stay in range).
    assert all(e - s <= 2 for s, e in sample_spans(300, np.random.default_rng(1), max_length=2))


def test_span_sampling_is_reproducible():
    draw = [sample_spans(200, np.random.default_rng(7)) for _ in range(2)]
    assert draw[0] == draw[1]
    assert sample_spans(200, np.random.default_rng(8)) != draw[0]
    tokens = np.arange(1, 90)
    a = make_sample(tokens, G, np.random.default_rng(3), "token")
    b = make_sample(tokens, G, np.random.default_rng(3), "token")
    assert (a.input_ids == b.input_ids).all() and (a.position_ids == b.position_ids).all()


def test_token_variant_samples_are_valid():
    rng = np.random.default_rng(0)
    for n in (2, 3, 7, 40, 150):
        tokens = rng.integers(1, 100, n)
        for _ in range(20):
            s = make_sample(tokens, G, rng, "token")
            part_b = s.input_ids[s.part_a_len :]
            k = int((part_b == G.sop).sum())
            spans = _spans_of(s)
            assert len(spans) == k
            check_sample(s, tokens, spans, G.mask)
            assert len(s) <= n + 2 * math.ceil(0.15 * n)  # the bound the loader sizes texts by


def _spans_of(s: GlmSample, glm: GlmTokens = G) -> list[tuple[int, int]]:
    """The [start, end) of each blanked span in the original text, recovered from Part A and Part B."""
    a = s.part_a_len
    lengths = {}
    starts = a + np.flatnonzero(s.input_ids[a:] == glm.sop)
    for b0, b1 in zip(starts, [*starts[1:], len(s)], strict=True):
        lengths[int(s.position_ids[b0, 0])] = b1 - b0 - 1
    spans, shift = [], 0
    for i in range(a):
        if i in lengths:
            spans.append((i + shift, i + shift + lengths[i]))
            shift += lengths[i] - 1
    return spans


def test_document_variant():
    rng = np.random.default_rng(0)
    for n in (2, 5, 30, 100):
        tokens = rng.integers(1, 100, n)
        seen = set()
        for _ in range(40):
            s = make_sample(tokens, G, rng, "document")
            (span,) = _spans_of(s)
            assert span[1] == n and math.ceil(0.5 * n) <= span[1] - span[0] <= n  # at the end, 50-100%
            assert s.input_ids[s.part_a_len - 1] == G.gmask
            check_sample(s, tokens, [span], G.gmask)
            seen.add(span[1] - span[0])
        if n >= 30:
            assert len(seen) > 5  # the length varies


@pytest.fixture(scope="module")
def prose_tokenizer() -> Tokenizer:
    texts = [
        "The cat sat on the mat. A dog ran to the red door! Did the bird sing?\nIt did. Then all was quiet."
    ] * 20 + ["one two three four five six seven eight nine ten"] * 5
    return Tokenizer.train(texts, 330, "glm4", min_frequency=1)


class _Pieces:
    """A stand-in tokenizer whose token i decodes to pieces[i]."""

    def __init__(self, pieces: list[str], special: set[int]) -> None:
        self.pieces, self.special_token_ids, self.vocab_size = pieces, special, len(pieces)

    def decode(self, ids: list[int]) -> str:
        return "".join(self.pieces[i] for i in ids)


def test_sentence_end_rule(prose_tokenizer):
    pieces = ["a", ".", " .", "x. ", "!\t", "?\n", "\n\n", "3.1", " ...", "?)", "<eop>."]
    ends = sentence_end_table(_Pieces(pieces, special={10}))
    assert ends.tolist() == [False, True, True, True, True, True, True, False, True, False, False]
    tok = prose_tokenizer
    ends = sentence_end_table(tok)
    assert ends.shape == (tok.vocab_size,) and not ends[list(tok.special_token_ids)].any()
    ids = np.array(tok.encode("The cat sat. A dog ran! Did it?\nYes"))
    pieces = [tok.decode(ids[s:e].tolist()) for s, e in sentences(ids, ends)]
    assert pieces == ["The cat sat.", " A dog ran!", " Did it?\n", "Yes"]


def test_sentence_variant(prose_tokenizer):
    tok = prose_tokenizer
    glm, ends = GlmTokens.from_tokenizer(tok), sentence_end_table(tok)
    text = " ".join(
        ["The cat sat on the mat.", "A dog ran to the red door!", "Did the bird sing?", "It did.", "All was quiet."] * 3
    )
    tokens = np.array(tok.encode(text))
    bounds = {s for s, _ in sentences(tokens, ends)} | {len(tokens)}
    rng = np.random.default_rng(0)
    for _ in range(30):
        s = make_sample(tokens, glm, rng, "sentence", ends)
        a = s.part_a_len
        assert (s.input_ids[:a] == glm.smask).any() and not (s.input_ids[:a] == glm.mask).any()
        spans = _spans_of(s, glm)
        assert sum(e - b for b, e in spans) >= 0.15 * len(tokens)
        for b, e in spans:
            assert b in bounds and e in bounds  # whole sentences
        for (_, e0), (b1, _) in zip(spans, spans[1:], strict=False):
            assert e0 < b1
        check_sample(s, tokens, spans, glm.smask, glm)
    # Without sentence ends (or with a single sentence) the token-level spans are used.
    flat = np.array(tok.encode("one two three four five six seven eight nine ten"))
    assert sample_sentence_spans(flat, ends, rng) is None
    s = make_sample(flat, glm, rng, "sentence", ends)
    assert (s.input_ids[: s.part_a_len] == glm.mask).any()


# --- 2D RoPE --------------------------------------------------------------------------------------------
def _rope_reference(x: torch.Tensor, pos: torch.Tensor, dim: int, theta: float, interleaved: bool) -> torch.Tensor:
    """Plain RoPE of width `dim` on x [..., T, dim] at positions [T] (float64; no lmforge code)."""
    x = x.double()
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    ang = pos.double()[:, None] * inv  # [T, dim/2]
    cos, sin = ang.cos(), ang.sin()
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    else:
        a, b = x[..., : dim // 2], x[..., dim // 2 :]
        out = torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
    return out


@pytest.mark.parametrize("interleaved,partial", [(False, 1.0), (True, 0.5)])
def test_2d_rope_rotates_each_half_by_its_position(interleaved, partial):
    family = "glm" if interleaved else "llama"
    c = ModelConfig(**SMALL, head_dim=16, partial_rotary_factor=partial, rope_interleaved=interleaved, family=family)
    R = c.rotary_dim
    T = 9
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, T, c.head_dim, generator=gen)  # [B, N, T, D]
    p1, p2 = torch.randint(0, 50, (T,), generator=gen), torch.randint(0, 10, (T,), generator=gen)
    positions = torch.stack([p1, p2], -1)[None].expand(2, T, 2)
    cos, sin = RotaryEmbedding(c)(positions, torch.float32)
    assert cos.shape == (2, 1, T, 2, R // 2)
    out = apply_rope(x, cos, sin, interleaved)
    half = R // 2
    want = torch.cat(
        [
            _rope_reference(x[..., :half], p1, half, c.rope_theta, interleaved),
            _rope_reference(x[..., half:R], p2, half, c.rope_theta, interleaved),
            x[..., R:].double(),
        ],
        dim=-1,
    )
    assert torch.allclose(out.double(), want, atol=1e-5)
    # Relative in both ids: shifting #1 (or #2) of queries and keys alike leaves q.k unchanged.
    q, k = x[:, :, :1], x[:, :, 1:2]

    def score(a1: int, a2: int, b1: int, b2: int) -> float:
        pq = torch.tensor([[[a1, a2]]])
        pk = torch.tensor([[[b1, b2]]])
        rq = apply_rope(q, *RotaryEmbedding(c)(pq.expand(2, 1, 2), torch.float32), interleaved)
        rk = apply_rope(k, *RotaryEmbedding(c)(pk.expand(2, 1, 2), torch.float32), interleaved)
        return float((rq * rk).sum())

    base = score(7, 2, 3, 0)
    assert math.isclose(base, score(27, 2, 23, 0), abs_tol=1e-3)
    assert math.isclose(base, score(7, 5, 3, 3), abs_tol=1e-3)
    assert not math.isclose(base, score(7, 3, 3, 0), abs_tol=1e-3)


def test_ordinary_positions_unchanged_and_2d_runs():
    torch.manual_seed(0)
    for family, kw in (("llama", {}), ("glm", dict(head_dim=16, partial_rotary_factor=0.5, rope_interleaved=True))):
        model = Transformer(ModelConfig(**SMALL, family=family, **kw)).eval()
        ids = torch.randint(0, 100, (2, 11))
        with torch.no_grad():
            plain = model(ids)
            assert torch.equal(plain, model(ids, position_ids=torch.arange(11)))
            assert torch.equal(plain, model(ids, position_ids=torch.arange(11).expand(2, 11)))
            # 2D positions with #2 = 0 and #1 = arange: a different (2D) encoding, same causal attention.
            pos2d = torch.stack([torch.arange(11), torch.zeros(11, dtype=torch.long)], -1)[None].expand(2, 11, 2)
            two_d = model(ids, position_ids=pos2d)
        assert two_d.shape == plain.shape and torch.isfinite(two_d).all()
        assert not torch.allclose(two_d, plain)
        # The 1D tables are the full-width ones, computed exactly as before (theta^(-2i/R) over R dims).
        c = model.config
        cos, _ = RotaryEmbedding(c)(torch.arange(11)[None], torch.float32)
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.rotary_dim, 2, dtype=torch.int64).float() / c.rotary_dim))
        first = (torch.arange(11)[:, None].float() * inv).cos()
        assert torch.equal(cos[0, 0, :, 0::2] if c.rope_interleaved else cos[0, 0, :, : c.rotary_dim // 2], first)


def test_2d_rope_needs_rotary_dim_multiple_of_4():
    c = ModelConfig(**SMALL, head_dim=12, partial_rotary_factor=0.5, rope_interleaved=True, family="glm")  # R = 6
    with pytest.raises(LmforgeError, match="multiple of 4"):
        RotaryEmbedding(c)(torch.zeros(1, 3, 2, dtype=torch.long), torch.float32)


def test_cached_decoding_matches_the_training_forward():
    """Infilling's layout (Part A prefilled bidirectionally, then Part B one token at a time from the
    cache) computes exactly the logits the training forward with the GLM mask computes."""
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(**SMALL, head_dim=16, partial_rotary_factor=0.5, rope_interleaved=True, family="glm")
    )
    model.eval()
    tokens = np.arange(1, 21)
    s = build_sample(tokens, [(3, 6), (10, 11), (15, 19)], [2, 0, 1], G)
    batch = collate([s], G.pad)
    with torch.no_grad():
        full = model(batch["input_ids"], batch["position_ids"], batch["attention_mask"])  # [1, L, V]
        a = s.part_a_len
        cache = KVCache(model.config, 1, len(s))
        ids, pos = batch["input_ids"], batch["position_ids"]
        prefix = model(ids[:, :a], pos[:, :a], torch.ones(1, 1, a, a, dtype=torch.bool), cache)
        steps = [model(ids[:, t : t + 1], pos[:, t : t + 1], cache=cache) for t in range(a, len(s))]
    assert torch.allclose(prefix, full[:, :a], atol=1e-5)
    assert torch.allclose(torch.cat(steps, 1), full[:, a:], atol=1e-5)


# --- batches --------------------------------------------------------------------------------------------
def test_collate_pads_without_changing_the_loss():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SMALL, family="llama"))
    rng = np.random.default_rng(0)
    samples = [make_sample(rng.integers(1, 100, n), G, rng, "token") for n in (30, 12, 21)]
    batch = collate(samples, G.pad)
    T = max(len(s) for s in samples)
    assert batch["input_ids"].shape == (3, T) and batch["position_ids"].shape == (3, T, 2)
    assert batch["attention_mask"].shape == (3, 1, T, T) and batch["attention_mask"].dtype == torch.bool
    for b, s in enumerate(samples):
        n = len(s)
        assert (batch["labels"][b, n:] == IGNORE_INDEX).all() and (batch["input_ids"][b, n:] == G.pad).all()
        m = batch["attention_mask"][b, 0]
        assert not m[:n, n:].any()  # real tokens never see padding
        assert torch.equal(m[n:, :], torch.eye(T, dtype=torch.bool)[n:])  # padding sees only itself
        assert torch.equal(m[:n, :n], torch.from_numpy(s.attention_mask()))
    out = causal_lm(model, batch)
    assert torch.isfinite(out.loss_sum)
    alone = [causal_lm(model, collate([s], G.pad)) for s in samples]
    assert torch.allclose(out.loss_sum, sum(o.loss_sum for o in alone), rtol=1e-5)
    assert int(out.weight) == sum(int(o.weight) for o in alone) == sum(int((s.labels >= 0).sum()) for s in samples)
    out.loss_sum.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def color_texts(n: int, seed: int) -> list[str]:
    """Runs of 6-13 consecutive colours from a fixed cycle: a blank is determined by its neighbours."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        start, length = int(rng.integers(len(COLORS))), int(rng.integers(6, 14))
        out.append("colors: " + " ".join(COLORS[(start + j) % len(COLORS)] for j in range(length)))
    return out


@pytest.fixture(scope="module")
def color_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("colors")
    texts = color_texts(300, 0)
    for i, t in enumerate(texts):
        (root / f"doc{i:03d}.txt").write_text(t)
    tok = Tokenizer.train(texts, 320, "glm4", min_frequency=1)
    prepare([str(root / "*.txt")], tok, root / "data", val_fraction=0.05, seed=0, progress=False)
    return root / "data"


def test_loader_batches_fit_and_cover_every_text(color_data):
    shards = TokenShards(color_data)
    tok = Tokenizer.from_pretrained(color_data / "tokenizer")
    glm = GlmTokens.from_tokenizer(tok)
    loader = GlmLoader(shards, glm, 8, 24, seed=0, variant="mixed", sentence_ends=sentence_end_table(tok))
    assert (loader.units[:, 1] <= max_text_tokens(24, "token")).all()
    # Every token of every document (EOS aside) is in exactly one unit.
    assert loader.units[:, 1].sum() == shards.num_tokens - shards.num_documents
    seen = []
    for _ in range(-(-len(loader.units) // 8)):
        before = (loader.epoch, loader.position)
        batch = next(loader)
        assert batch["input_ids"].shape[1] <= 24 and batch["position_ids"].shape[-1] == 2
        assert set(batch) == {"input_ids", "labels", "position_ids", "attention_mask"}
        seen += loader.order(before[0])[before[1] : before[1] + 8].tolist()
    assert sorted(seen[: len(loader.units)]) == list(range(len(loader.units)))
    blanks = torch.cat([b["input_ids"].flatten() for b in [next(loader) for _ in range(10)]])
    assert {glm.mask, glm.gmask} <= set(blanks.tolist())  # mixed: several variants (no sentences in colours)
    # One evaluation pass is finite and visits every unit once.
    fixed = GlmLoader(shards, glm, 8, 24, shuffle=False)
    assert sum(b["input_ids"].shape[0] for b in fixed.one_epoch()) == len(fixed.units)


def test_loader_resume_is_exact(color_data, tmp_path):
    shards = TokenShards(color_data)
    glm = GlmTokens.from_tokenizer(Tokenizer.from_pretrained(color_data / "tokenizer"))
    loader = GlmLoader(shards, glm, 16, 32, seed=3, variant="document")
    for _ in range(20):  # several epochs: the ~86 training texts are served 16 at a time
        next(loader)
    torch.save(loader.state_dict(), tmp_path / "state.pt")
    want = [next(loader) for _ in range(6)]
    again = GlmLoader(shards, glm, 16, 32, seed=3, variant="document")
    again.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    got = [next(again) for _ in range(6)]
    for w, g in zip(want, got, strict=True):
        for key in w:
            assert torch.equal(w[key], g[key]), key
    other = GlmLoader(shards, glm, 16, 32, seed=3, variant="token")
    with pytest.raises(LmforgeError, match="variant"):
        other.load_state_dict(loader.state_dict())


def test_train_config_validates_glm_options():
    assert TrainConfig(objective="glm", glm_variant="mixed").objective == "glm"
    with pytest.raises(LmforgeError, match="objective"):
        TrainConfig(objective="glmm")
    with pytest.raises(LmforgeError, match="glm_variant"):
        TrainConfig(objective="glm", glm_variant="sentences")
    with pytest.raises(LmforgeError, match="mask_documents"):
        TrainConfig(objective="glm", mask_documents=True)


TINY_GLM = dict(
    vocab_size=320,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=128,
    head_dim=32,
    partial_rotary_factor=0.5,
    rope_interleaved=True,
    qkv_bias=True,
    tie_embeddings=True,
    max_position_embeddings=128,
    family="glm",
)


@pytest.fixture(scope="module")
def glm_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny-glm.json"
    path.write_text(json.dumps(TINY_GLM))
    return path


def test_pretrain_glm_needs_glm_tokens(tmp_path, glm_config):
    texts = color_texts(20, 1)
    for i, t in enumerate(texts):
        (tmp_path / f"d{i}.txt").write_text(t)
    tok = Tokenizer.train(texts, 300, "llama3", min_frequency=1)
    prepare([str(tmp_path / "*.txt")], tok, tmp_path / "data", val_fraction=0.0, progress=False)
    cfg = TrainConfig(steps=2, batch_size=2, seq_len=32, objective="glm")
    with pytest.raises(LmforgeError, match=r"\[MASK\].*--chat-format glm4"):
        pretrain(str(glm_config), tmp_path / "data", tmp_path / "run", cfg, progress=False)


def test_pretrain_glm_resumes_exactly(tmp_path, color_data, glm_config, monkeypatch):
    cfg = TrainConfig(
        dtype="float32",
        steps=6,
        batch_size=4,
        seq_len=32,
        lr=3e-3,
        warmup_steps=1,
        eval_every=0,
        save_every=0,
        objective="glm",
        glm_variant="mixed",
    )
    straight = pretrain(str(glm_config), color_data, tmp_path / "straight", cfg, progress=False)
    # The second run gets a real SIGINT while fetching the batch of step 4: it finishes that step, saves
    # (loader position and span RNG included) and returns; then it is resumed.
    real_next = GlmLoader.__next__
    calls = {"n": 0}

    def next_with_interrupt(self):
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return real_next(self)

    monkeypatch.setattr(GlmLoader, "__next__", next_with_interrupt)
    first = pretrain(str(glm_config), color_data, tmp_path / "resumed", cfg, progress=False)
    monkeypatch.setattr(GlmLoader, "__next__", real_next)
    assert first.result.interrupted and first.result.steps == 4
    second = pretrain(str(glm_config), color_data, tmp_path / "resumed", cfg, resume=True, progress=False)
    a = [r["loss"] for r in straight.result.history if "loss" in r]
    b = [r["loss"] for r in first.result.history + second.result.history if "loss" in r]
    assert a == b  # bit for bit: the same batches (data order and spans), the same optimizer state


# --- training with --objective glm, then infilling -----------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, color_data, glm_config) -> tuple[Path, list[dict]]:
    """A tiny GLM-family model trained by `lmforge pretrain --objective glm` on the colour cycles."""
    run = tmp_path_factory.mktemp("glm-run") / "run"
    argv = ["pretrain", "--model", str(glm_config), "--data", str(color_data), "--out", str(run)]
    argv += ["--objective", "glm", "--glm-variant", "token", "--steps", "400", "--batch-size", "16"]
    argv += ["--seq-len", "32", "--lr", "5e-3", "--warmup-steps", "20", "--eval-every", "200", "--save-every", "0"]
    assert cli_main(argv) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return run, records


def test_glm_training_reduces_the_loss(trained):
    run, records = trained
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 400
    assert np.mean(losses[-20:]) < 0.15 * np.mean(losses[:5])
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(vals) == 2 and vals[-1] < 0.5
    assert json.loads((run / "run.json").read_text())["train"]["objective"] == "glm"


def test_infill_fills_blanks_exactly(trained):
    model, tok = load_model_and_tokenizer(str(trained[0]), None)
    cases = {
        "colors: red orange [MASK] green blue indigo": "colors: red orange yellow green blue indigo",
        "colors: white gray [MASK] pink red orange yellow": "colors: white gray brown pink red orange yellow",
        "colors: green blue indigo [MASK] black white gray": "colors: green blue indigo violet black white gray",
        "colors: pink red orange yellow [MASK] violet black": (
            "colors: pink red orange yellow green blue indigo violet black"
        ),
        # two blanks: the second is filled after (and attending to) the first, as Part B is trained
        "colors: yellow green [MASK] indigo violet [MASK] white gray": (
            "colors: yellow green blue indigo violet black white gray"
        ),
    }
    for text, want in cases.items():
        assert infill(model, tok, text) == want, text
    # Sampling goes through lmforge.generate's processors: nearly greedy at a low temperature, reproducible.
    text = "colors: red orange [MASK] green blue indigo"
    assert infill(model, tok, text, do_sample=True, temperature=0.01, seed=0) == cases[text]
    hot = [infill(model, tok, text, do_sample=True, temperature=5.0, seed=1) for _ in range(2)]
    assert hot[0] == hot[1]
    text, spans = infill_with_spans(model, tok, "colors: red orange [MASK] green blue")
    assert [tok.decode(s) for s in spans] == [" yellow"]
    # infill_ids: the same on ids; the stop token <eop> is not part of a span, and the limit is honoured.
    glm = GlmTokens.from_tokenizer(tok)
    ids = tok.encode("colors: red orange") + [glm.mask] + tok.encode(" green blue")
    assert infill_ids(model, ids, glm) == spans
    ids = tok.encode("colors: red orange") + [glm.mask] + tok.encode(" violet")
    assert infill_ids(model, ids, glm, max_new_tokens=2) == [tok.encode(" yellow green")]
    with pytest.raises(LmforgeError, match="no \\[MASK\\]"):
        infill(model, tok, "colors: red orange yellow")


def test_cli_generate_infill(trained, capsys):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lmforge", "generate", "--model", str(trained[0])]
    out = subprocess.run(
        [*cmd, "--infill", "colors: orange yellow [MASK] blue [MASK] violet"], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "colors: orange yellow green blue indigo violet\n"
    assert "filled 2 blank(s) with 2 tokens" in out.stderr
    # In process: --json, and flags that do not go with --infill.
    argv = ["generate", "--model", str(trained[0]), "--infill", "colors: blue indigo [MASK] black white"]
    assert cli_main([*argv, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["text"] == "colors: blue indigo violet black white" and record["spans"] == [" violet"]
    assert cli_main([*argv, "--chat"]) == 2
    assert "--chat" in capsys.readouterr().err


def test_build_attention_mask_passes_the_glm_mask_through():
    s = build_sample(np.arange(1, 9), [(2, 4)], [0], G)
    mask = collate([s], G.pad)["attention_mask"]
    assert torch.equal(build_attention_mask(mask, None, len(s)), mask)
