"""Logits processors: parity with the installed transformers, PAD handling, and sampling.

Every processor is compared with transformers' own processor on the same scores. transformers has no PAD
convention (a pad id counts as a token), so it gets each row unpadded, one row at a time, while lmforge
gets the left-padded batch (PAD = -1). The processors use the same fp32 operations in the same order, so
the results are compared exactly (torch.equal, including the -inf positions), not within a tolerance.

Shape letters: B batch, S sequence, V vocab, N number of draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from statistics import NormalDist

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers.generation import logits_process as hf

from lmforge.errors import LmforgeError
from lmforge.generate.options import GenerationOptions
from lmforge.generate.processors import (
    PAD,
    MinP,
    NoRepeatNGram,
    RepetitionPenalty,
    Temperature,
    TopK,
    TopP,
    TypicalP,
    apply_processors,
    build_processors,
    sample,
)

VOCABS = (50, 257, 1000)
SEQ = 40
REAL_LENGTHS = (SEQ, SEQ - 7, SEQ - 23)  # row 0 unpadded, rows 1 and 2 left-padded


def make_scores(vocab: int, kind: str, seed: int) -> torch.Tensor:
    """Random fp32 logits [3, V]: 'plain', 'ties' (values on a coarse grid, many exact ties), 'wide' (so
    spread out that most probabilities underflow to exactly 0, where ties in probability are not ties in
    score) or 'masked' (a third already at -inf, as after an earlier filter)."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(3, vocab, generator=gen) * 3
    if kind == "ties":
        scores = (scores * 2).round() / 2
    elif kind == "wide":
        scores = scores * 40
    elif kind == "masked":
        scores[torch.rand(3, vocab, generator=gen) < 1 / 3] = float("-inf")
    return scores


def make_rows(vocab: int, seed: int, id_range: int | None = None) -> list[torch.Tensor]:
    """Token rows of REAL_LENGTHS; a small id_range makes repeated n-grams likely."""
    gen = torch.Generator().manual_seed(seed + 1)
    high = min(id_range or vocab, vocab)
    return [torch.randint(0, high, (n,), generator=gen) for n in REAL_LENGTHS]


def left_pad(rows: list[torch.Tensor]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
    return ids


def reference(process: Callable, rows: list[torch.Tensor], scores: torch.Tensor) -> torch.Tensor:
    """transformers' result, one unpadded row at a time."""
    return torch.cat([process(r[None].clone(), scores[i : i + 1].clone()) for i, r in enumerate(rows)])


def assert_same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert torch.equal(torch.isneginf(ours), torch.isneginf(theirs)), "different filtered positions"
    assert torch.equal(ours, theirs), f"max diff {(ours - theirs).abs().nan_to_num(0).max().item()}"


# (test id, lmforge processor, transformers processor, id range of the rows)
CASES = [
    ("rep1.3", RepetitionPenalty(1.3), hf.RepetitionPenaltyLogitsProcessor(1.3), None),
    ("rep2", RepetitionPenalty(2.0), hf.RepetitionPenaltyLogitsProcessor(2.0), 20),
    ("rep0.7", RepetitionPenalty(0.7), hf.RepetitionPenaltyLogitsProcessor(0.7), None),
    ("ngram1", NoRepeatNGram(1), hf.NoRepeatNGramLogitsProcessor(1), None),
    ("ngram2", NoRepeatNGram(2), hf.NoRepeatNGramLogitsProcessor(2), 6),
    ("ngram3", NoRepeatNGram(3), hf.NoRepeatNGramLogitsProcessor(3), 3),
    ("ngram4", NoRepeatNGram(4), hf.NoRepeatNGramLogitsProcessor(4), 2),
    ("ngram20", NoRepeatNGram(20), hf.NoRepeatNGramLogitsProcessor(20), 1),  # longer than the shortest row
    ("temp0.7", Temperature(0.7), hf.TemperatureLogitsWarper(0.7), None),
    ("temp1.9", Temperature(1.9), hf.TemperatureLogitsWarper(1.9), None),
    ("topk1", TopK(1), hf.TopKLogitsWarper(1), None),
    ("topk10", TopK(10), hf.TopKLogitsWarper(10), None),
    ("topk_over_vocab", TopK(5000), hf.TopKLogitsWarper(5000), None),
    ("topk1_keep3", TopK(1, 3), hf.TopKLogitsWarper(1, min_tokens_to_keep=3), None),
    ("topp1e-9", TopP(1e-9), hf.TopPLogitsWarper(1e-9), None),
    ("topp0.3", TopP(0.3), hf.TopPLogitsWarper(0.3), None),
    ("topp0.9", TopP(0.9), hf.TopPLogitsWarper(0.9), None),
    ("topp0.95_keep5", TopP(0.95, 5), hf.TopPLogitsWarper(0.95, min_tokens_to_keep=5), None),
    ("topp1e-9_keep4", TopP(1e-9, 4), hf.TopPLogitsWarper(1e-9, min_tokens_to_keep=4), None),
    ("minp0.05", MinP(0.05), hf.MinPLogitsWarper(0.05), None),
    ("minp0.3", MinP(0.3), hf.MinPLogitsWarper(0.3), None),
    ("minp1", MinP(1.0), hf.MinPLogitsWarper(1.0), None),
    ("minp0.9_keep4", MinP(0.9, 4), hf.MinPLogitsWarper(0.9, min_tokens_to_keep=4), None),
    ("minp0.5_keep50", MinP(0.5, 50), hf.MinPLogitsWarper(0.5, min_tokens_to_keep=50), None),
    ("typical0.2", TypicalP(0.2), hf.TypicalLogitsWarper(0.2), None),
    ("typical0.9", TypicalP(0.9), hf.TypicalLogitsWarper(0.9), None),
    ("typical0.99", TypicalP(0.99), hf.TypicalLogitsWarper(0.99), None),
    ("typical0.1_keep3", TypicalP(0.1, 3), hf.TypicalLogitsWarper(0.1, min_tokens_to_keep=3), None),
]


@pytest.mark.parametrize("kind", ["plain", "ties", "wide", "masked"])
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize(("ours", "theirs", "id_range"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_matches_transformers(ours, theirs, id_range, vocab: int, kind: str) -> None:
    seed = vocab + len(kind)
    scores = make_scores(vocab, kind, seed)
    rows = make_rows(vocab, seed, id_range)
    ids = left_pad(rows)
    scores_before, ids_before = scores.clone(), ids.clone()
    out = ours(ids, scores)
    assert torch.equal(scores, scores_before) and torch.equal(ids, ids_before), "inputs were modified"
    assert_same(out, reference(theirs, rows, scores))
    assert torch.isfinite(out).any(-1).all(), "a row lost every token"


@pytest.mark.parametrize(("ours", "id_range"), [(c[1], c[3]) for c in CASES], ids=[c[0] for c in CASES])
def test_padded_row_equals_unpadded_row(ours, id_range) -> None:
    vocab = 257
    scores = make_scores(vocab, "plain", 3)
    rows = make_rows(vocab, 3, id_range)
    batched = ours(left_pad(rows), scores)
    for i, r in enumerate(rows):
        assert torch.equal(batched[i : i + 1], ours(r[None], scores[i : i + 1]))


def test_cases_are_not_trivial() -> None:
    """The parity cases above really change scores: penalties touch the repeated ids and n-grams get banned."""
    vocab = 257
    scores = make_scores(vocab, "plain", 0)
    for name, ours, _, id_range in CASES:
        rows = make_rows(vocab, 0, id_range)
        out = ours(left_pad(rows), scores)
        if name == "ngram20":
            assert torch.equal(out[2], scores[2]), "a row shorter than n bans nothing"
            assert torch.isneginf(out[:2]).sum(-1).tolist() == [1, 1]  # rows of one repeated id ban it
        elif not name.startswith("topk_over"):
            assert not torch.equal(out, scores), name


@pytest.mark.parametrize("vocab", [4, 8])
@pytest.mark.parametrize("top_p", [0.25, 0.5, 0.75])
def test_top_p_keeps_the_smallest_set_reaching_p(vocab: int, top_p: float) -> None:
    """Equal logits give exact probabilities 1/V and exact running sums, so the boundary is hit exactly:
    a set whose mass equals p is enough (transformers removes sums <= 1 - p)."""
    scores = torch.zeros(2, vocab)
    out = TopP(top_p)(torch.zeros(2, 1, dtype=torch.long), scores)
    assert_same(out, hf.TopPLogitsWarper(top_p)(torch.zeros(2, 1, dtype=torch.long), scores.clone()))
    assert torch.isfinite(out).sum(-1).tolist() == [round(vocab * top_p)] * 2


def test_repetition_penalty_semantics() -> None:
    scores = torch.tensor([[2.0, -2.0, 0.0, 1.0, -1.0]])
    ids = torch.tensor([[PAD, PAD, 0, 1, 2, 0, 0]])
    out = RepetitionPenalty(2.0)(ids, scores)
    assert out.tolist() == [[1.0, -4.0, 0.0, 1.0, -1.0]]  # once per id however often it occurs; PAD ignored


def test_no_repeat_ngram_semantics() -> None:
    scores = torch.zeros(1, 6)
    # bigrams so far: (1,2) (2,3) (3,1) (1,2)... the row ends in 1, so 2 would repeat (1,2)
    ids = torch.tensor([[PAD, PAD, 1, 2, 3, 1]])
    out = NoRepeatNGram(2)(ids, scores)
    assert torch.isneginf(out).nonzero()[:, 1].tolist() == [2]
    # the PAD run forms no n-grams: ending in a PAD-like context bans nothing
    assert torch.equal(NoRepeatNGram(3)(torch.tensor([[PAD, PAD, 4, 4]]), scores), scores)


# --- the chain, against transformers' own `_get_logits_processor` --------------------------------------


@pytest.fixture(scope="module")
def tiny_hf_model() -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def hf_chain(model: LlamaForCausalLM, options: GenerationOptions, num_beams: int = 1, eos=None):
    """transformers' processor list for the same options (its GenerationConfig fields default to None = off)."""
    config = GenerationConfig(
        do_sample=options.do_sample,
        num_beams=num_beams,
        temperature=options.temperature,
        top_k=options.top_k,
        top_p=options.top_p,
        min_p=options.min_p if options.min_p > 0 else None,  # transformers adds MinP whenever min_p is not None
        typical_p=options.typical_p,
        repetition_penalty=options.repetition_penalty,
        no_repeat_ngram_size=options.no_repeat_ngram_size,
    )
    config._eos_token_tensor = eos  # what generate() sets; beam search keeps len(eos) + 1 tokens
    return model._get_logits_processor(generation_config=config, input_ids_seq_length=SEQ, device="cpu")


OUR_TO_HF = {
    RepetitionPenalty: hf.RepetitionPenaltyLogitsProcessor,
    NoRepeatNGram: hf.NoRepeatNGramLogitsProcessor,
    Temperature: hf.TemperatureLogitsWarper,
    TopK: hf.TopKLogitsWarper,
    TopP: hf.TopPLogitsWarper,
    MinP: hf.MinPLogitsWarper,
    TypicalP: hf.TypicalLogitsWarper,
}

CHAINS = {
    "everything": dict(
        do_sample=True,
        temperature=0.8,
        top_k=40,
        top_p=0.9,
        min_p=0.02,
        typical_p=0.95,
        repetition_penalty=1.2,
        no_repeat_ngram_size=2,
    ),
    "greedy_penalties": dict(
        do_sample=False, temperature=0.5, top_k=10, repetition_penalty=1.5, no_repeat_ngram_size=3
    ),
    "temperature_top_p": dict(do_sample=True, temperature=1.3, top_p=0.8),
    "min_p_typical": dict(do_sample=True, min_p=0.1, typical_p=0.5, repetition_penalty=0.8),
    "default": dict(),
}


@pytest.mark.parametrize("name", list(CHAINS))
def test_chain_matches_transformers(tiny_hf_model, name: str) -> None:
    options = GenerationOptions(**CHAINS[name])
    ours = build_processors(options)
    theirs = hf_chain(tiny_hf_model, options)
    assert [OUR_TO_HF[type(p)] for p in ours] == [type(p) for p in theirs]
    vocab = tiny_hf_model.config.vocab_size
    scores = make_scores(vocab, "plain", 11)
    rows = make_rows(vocab, 11, id_range=8)
    assert_same(apply_processors(ours, left_pad(rows), scores), reference(theirs, rows, scores))


def test_chain_min_tokens_to_keep_matches_beam_search(tiny_hf_model) -> None:
    """transformers keeps len(eos) + 1 tokens when sampling with beams; build_processors takes that number."""
    options = GenerationOptions(do_sample=True, top_k=1, top_p=1e-9, min_p=1.0, typical_p=0.01)
    ours = build_processors(options, min_tokens_to_keep=3)
    theirs = hf_chain(tiny_hf_model, options, num_beams=2, eos=torch.tensor([1, 2]))
    assert [p.min_tokens_to_keep for p in ours] == [p.min_tokens_to_keep for p in theirs] == [3, 3, 3, 3]
    scores = make_scores(300, "plain", 5)
    rows = make_rows(300, 5)
    out = apply_processors(ours, left_pad(rows), scores)
    assert_same(out, reference(theirs, rows, scores))
    assert (torch.isfinite(out).sum(-1) >= 3).all()


def test_build_processors_order_and_off_values() -> None:
    assert build_processors(GenerationOptions()) == []
    assert build_processors(GenerationOptions(do_sample=True)) == []
    # warpers only when sampling; temperature 0 means greedy
    assert build_processors(GenerationOptions(temperature=0.5, top_k=5, top_p=0.5, min_p=0.1, typical_p=0.5)) == []
    assert build_processors(GenerationOptions(do_sample=True, temperature=0, top_k=5)) == []
    got = build_processors(
        GenerationOptions(
            do_sample=True,
            typical_p=0.7,
            min_p=0.05,
            top_p=0.9,
            top_k=7,
            temperature=0.6,
            no_repeat_ngram_size=3,
            repetition_penalty=1.1,
        ),
        min_tokens_to_keep=2,
    )
    assert got == [
        RepetitionPenalty(1.1),
        NoRepeatNGram(3),
        Temperature(0.6),
        TopK(7, 2),
        TopP(0.9, 2),
        MinP(0.05, 2),
        TypicalP(0.7, 2),
    ]


def test_invalid_parameters_raise_lmforge_error() -> None:
    for bad in (
        lambda: RepetitionPenalty(0.0),
        lambda: NoRepeatNGram(0),
        lambda: Temperature(0.0),
        lambda: TopK(0),
        lambda: TopP(0.0),
        lambda: TopP(0.5, 0),
        lambda: MinP(1.5),
        lambda: TypicalP(0.0),
    ):
        with pytest.raises(LmforgeError):
            bad()


# --- sampling --------------------------------------------------------------------------------------------


def test_sample_is_reproducible_with_a_seed() -> None:
    scores = torch.randn(256, 1000, generator=torch.Generator().manual_seed(0))  # [B, V]

    def draw(seed: int) -> torch.Tensor:
        return sample(scores, torch.Generator().manual_seed(seed))

    first = draw(1)
    assert first.shape == (256,) and first.dtype == torch.long
    assert torch.equal(first, draw(1))
    assert not torch.equal(first, draw(2))


def chi2_quantile(q: float, dof: int) -> float:
    """The q-quantile of the chi-square distribution (scipy if installed, else Wilson-Hilferty, which is
    within about 1% for dof >= 3 at these quantiles)."""
    try:
        from scipy.stats import chi2
    except ImportError:
        z = NormalDist().inv_cdf(q)
        return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    return float(chi2.ppf(q, dof))


def test_sample_follows_the_processed_distribution() -> None:
    vocab, draws = 8, 20000
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(3))  # [1, V]
    processors = build_processors(GenerationOptions(do_sample=True, top_k=5, temperature=0.7))
    assert processors == [Temperature(0.7), TopK(5)]
    scores = apply_processors(processors, torch.zeros(1, 1, dtype=torch.long), logits)
    kept = torch.isfinite(scores[0])
    assert int(kept.sum()) == 5
    probs = scores[0].softmax(-1).double()  # [V]; the expected distribution, from the processed scores
    tokens = sample(scores.expand(draws, vocab), torch.Generator().manual_seed(0))  # [N]
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert counts[~kept].sum() == 0, "a filtered token was drawn"
    expected = probs[kept] * draws
    statistic = float(((counts[kept] - expected) ** 2 / expected).sum())
    dof = int(kept.sum()) - 1
    assert statistic < chi2_quantile(0.999, dof), f"chi-square {statistic:.2f} with {dof} dof"


def test_filtered_tokens_are_never_drawn() -> None:
    vocab = 1000
    scores = make_scores(vocab, "plain", 7)
    filtered = apply_processors([Temperature(1.5), TopK(50), TopP(0.5)], torch.zeros(3, 1, dtype=torch.long), scores)
    allowed = torch.isfinite(filtered)  # [B, V]
    tokens = sample(filtered.repeat(2000, 1), torch.Generator().manual_seed(0))  # [2000 * B]
    assert allowed.repeat(2000, 1).gather(-1, tokens[:, None]).all()
