"""Beam search parity with transformers' `generate(num_beams=...)` on tiny random models of each family.

Each family's random HF model is saved with `save_pretrained` and loaded with `lmforge.load_pretrained`;
both sides decode the same prompt and must return the same tokens (token for token, in transformers'
order) and the same `sequences_scores` within 1e-4. The eos ids are tokens that greedy decoding of the
prompt actually produces, so that beams do finish early and the length penalty and early-stopping rules
decide the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FAMILIES, make_hf_model

import lmforge
from lmforge.generate.beam import beam_search
from lmforge.generate.decode import Decoder, left_pad
from lmforge.generate.options import GenerationOptions
from lmforge.generate.processors import PAD, build_processors

SCORE_ATOL = 1e-4
MAX_NEW = 10
PROMPT = [5, 17, 42, 99, 3, 250]
PAD_ID = 0  # inside the vocab, as GLM needs


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: a second thread gains nothing, and when the cores are busy OpenMP's spinning
    threads made single tests take seconds instead of milliseconds (measured: 65 s vs 9 s for this file)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path: Path = tmp_path_factory.mktemp(request.param)
    hf = make_hf_model(request.param, path, intermediate_size=96, head_dim=16, seed=1)
    ours = lmforge.load_pretrained(path)
    greedy = hf.generate(
        torch.tensor([PROMPT]), do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=PAD_ID, eos_token_id=None
    )[0, len(PROMPT) :].tolist()
    # eos candidates: tokens greedy produces at steps 1..4 (0-based), so beams can end after a few tokens.
    eos_choices = list(dict.fromkeys(greedy[1:5]))
    return {"name": request.param, "hf": hf, "ours": ours, "eos_choices": eos_choices}


def hf_beams(
    hf, prompt: Sequence[int], eos: Sequence[int], options: GenerationOptions, logits_processor: list | None = None
) -> list[tuple[list[int], float]]:
    """transformers' beams for one prompt: new tokens without padding (length from beam_indices) and scores."""
    from transformers import LogitsProcessorList

    out = hf.generate(
        torch.tensor([list(prompt)]),
        num_beams=options.num_beams,
        do_sample=False,
        max_new_tokens=options.max_new_tokens,
        length_penalty=options.length_penalty,
        early_stopping=options.early_stopping,
        num_return_sequences=options.num_return_sequences,
        eos_token_id=list(eos),
        pad_token_id=PAD_ID,
        repetition_penalty=options.repetition_penalty,
        no_repeat_ngram_size=options.no_repeat_ngram_size,
        logits_processor=LogitsProcessorList(logits_processor or []),
        output_scores=True,
        return_dict_in_generate=True,
    )
    # beam_indices holds -1 past each sequence's end, where `sequences` holds fill tokens.
    lengths = (out.beam_indices != -1).sum(-1).tolist()
    new = out.sequences[:, len(prompt) :]
    return [(new[r, : lengths[r]].tolist(), out.sequences_scores[r].item()) for r in range(len(lengths))]


def our_processors(options: GenerationOptions) -> list:
    """lmforge's processors for these options (transformers builds its own from the same option names)."""
    return build_processors(options)


def assert_same(ours: list[tuple[list[int], float]], theirs: list[tuple[list[int], float]], where: str) -> None:
    assert [t for t, _ in ours] == [t for t, _ in theirs], where
    for (_, a), (_, b) in zip(ours, theirs, strict=True):
        assert abs(a - b) < SCORE_ATOL, (where, a, b)


SETTINGS = [
    # num_beams, length_penalty, early_stopping, num_return_sequences, processor options
    (2, 1.0, False, 1, {}),
    (2, 1.0, True, 2, {}),
    (4, 1.0, False, 3, {}),
    (4, 0.5, True, 2, {}),
    (4, 0.5, False, 4, {}),
    (4, 2.0, "never", 4, {}),
    (4, 2.0, False, 2, {}),
    (3, 1.0, "never", 3, {}),
    (4, 1.0, "never", 2, {}),
    (4, 0.5, "never", 3, {}),
    (4, 1.0, False, 2, {"repetition_penalty": 1.3}),
    (2, 2.0, True, 1, {"repetition_penalty": 1.5}),
    (4, 0.5, "never", 4, {"repetition_penalty": 1.3}),
    # no_repeat_ngram bans tokens with -inf log-probs
    (4, 1.0, False, 4, {"no_repeat_ngram_size": 1}),
    (3, 0.5, True, 2, {"no_repeat_ngram_size": 2, "repetition_penalty": 1.2}),
]


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping,n_return,processing", SETTINGS)
def test_matches_transformers(family, num_beams, length_penalty, early_stopping, n_return, processing) -> None:
    options = GenerationOptions(
        max_new_tokens=MAX_NEW,
        num_beams=num_beams,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        num_return_sequences=n_return,
        **processing,
    )
    for eos in family["eos_choices"]:
        ours = beam_search(family["ours"], [PROMPT], options, [eos], our_processors(options))
        theirs = hf_beams(family["hf"], PROMPT, [eos], options)
        assert len(ours) == 1 and len(ours[0]) == n_return
        assert_same(ours[0], theirs, f"{family['name']} eos={eos}")


def test_several_eos_ids(family) -> None:
    """Two eos ids: transformers then keeps 3*num_beams candidates per step instead of 2*num_beams."""
    options = GenerationOptions(max_new_tokens=MAX_NEW, num_beams=3, early_stopping=False, num_return_sequences=3)
    eos = family["eos_choices"][:2]
    ours = beam_search(family["ours"], [PROMPT], options, eos, [])
    assert_same(ours[0], hf_beams(family["hf"], PROMPT, eos, options), family["name"])


def boost(token_ids: Sequence[int], amount: float):
    """A processor that adds `amount` to the scores of `token_ids` (usable on both sides: it only needs
    (input_ids, scores) -> scores)."""

    def process(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        scores[:, list(token_ids)] += amount
        return scores

    return process


@pytest.mark.parametrize(
    "num_beams,early_stopping,length_penalty",
    [(2, "never", 2.0), (3, "never", 2.0), (4, "never", 2.0), (3, False, 1.0), (4, True, 0.5)],
)
def test_eos_ids_crowd_the_candidates(family, num_beams, early_stopping, length_penalty) -> None:
    """Two boosted eos ids are the best tokens of every beam: more than num_beams of the 2*num_beams best
    candidates end, so the search needs the (1 + number of eos ids) * num_beams candidates transformers keeps
    to still have num_beams running beams (with "never" and length_penalty 2 the long beams win, and keeping
    only 2*num_beams candidates changes them). Also checks that a custom processor is applied the same way."""
    eos = family["eos_choices"][:2]
    options = GenerationOptions(
        max_new_tokens=MAX_NEW,
        num_beams=num_beams,
        early_stopping=early_stopping,
        length_penalty=length_penalty,
        num_return_sequences=num_beams,
    )
    ours = beam_search(family["ours"], [PROMPT], options, eos, [boost(eos, 3.0)])
    assert_same(ours[0], hf_beams(family["hf"], PROMPT, eos, options, [boost(eos, 3.0)]), family["name"])


def test_some_beams_finish_early(family) -> None:
    """The setup is meaningful: with these eos ids some returned beams end with an eos before max_new_tokens."""
    options = GenerationOptions(max_new_tokens=MAX_NEW, num_beams=4, num_return_sequences=4)
    early = 0
    for eos in family["eos_choices"]:
        for tokens, _ in beam_search(family["ours"], [PROMPT], options, [eos], [])[0]:
            early += len(tokens) < MAX_NEW and tokens[-1] == eos
    assert early > 0


@pytest.mark.parametrize(
    "rep_penalty,early_stopping,length_penalty",
    [(1.0, False, 0.5), (1.3, False, 1.0), (1.0, True, 2.0), (1.3, "never", 1.0)],
)
def test_batch_equals_each_prompt_alone(family, rep_penalty, early_stopping, length_penalty) -> None:
    """Prompts of different lengths batched (left-padded) give each prompt's beams alone, and transformers'.

    With a repetition penalty the processors' input marks padding as PAD, so padding is not penalised.
    With early_stopping=True a prompt whose hypotheses are complete accepts no more while the others go on.
    """
    prompts = [PROMPT, [7, 8], [120, 33, 61, 200, 9, 11, 48, 150, 2], [64]]
    options = GenerationOptions(
        max_new_tokens=MAX_NEW,
        num_beams=3,
        num_return_sequences=2,
        length_penalty=length_penalty,
        repetition_penalty=rep_penalty,
        early_stopping=early_stopping,
    )
    for eos in family["eos_choices"]:
        batched = beam_search(family["ours"], prompts, options, [eos], our_processors(options))
        for prompt, got in zip(prompts, batched, strict=True):
            where = f"{family['name']} eos={eos} {prompt}"
            alone = beam_search(family["ours"], [prompt], options, [eos], our_processors(options))[0]
            assert_same(got, alone, f"batched vs alone: {where}")
            assert_same(got, hf_beams(family["hf"], prompt, [eos], options), f"vs transformers: {where}")


def test_processors_see_pad_and_beam_tokens(family) -> None:
    """Processors get each beam's real tokens, left padding as PAD, in rows of num_beams per prompt."""
    prompts = [[11, 12, 13], [21]]
    seen: list[torch.Tensor] = []

    def spy(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        seen.append(input_ids.clone())
        return scores

    options = GenerationOptions(max_new_tokens=4, num_beams=2, early_stopping="never")
    results = beam_search(family["ours"], prompts, options, [], [spy])
    assert seen[0].tolist() == [[11, 12, 13]] * 2 + [[PAD, PAD, 21]] * 2
    assert [ids.shape for ids in seen] == [torch.Size([4, 3 + t]) for t in range(4)]
    # no eos: every beam runs to max_new_tokens and the best beam's tokens are one of the rows seen last
    last_rows = [row[3:] for row in seen[-1].tolist()]
    for b, hyps in enumerate(results):
        best = hyps[0][0]
        assert len(best) == 4 and best[:3] in last_rows[2 * b : 2 * b + 2]


def test_decoder_reorder_follows_rows(family) -> None:
    """After reorder(index), row i decodes exactly as row index[i] would have: cache, mask and positions."""
    model = family["ours"]
    prompts = [[4, 5, 6, 7], [8, 9]]
    decoder = Decoder(model, left_pad(prompts), 3)
    first = decoder.prefill()
    index = torch.tensor([1, 0, 1])
    decoder.reorder(index)
    assert decoder.mask.shape[0] == 3 and decoder.cache.k[0].shape[0] == 3
    step = torch.tensor([30, 31, 32])
    got = decoder.step(step)
    for row, (src, tok) in enumerate(zip(index.tolist(), step.tolist(), strict=True)):
        alone = Decoder(model, left_pad([prompts[src]]), 3)
        torch.testing.assert_close(alone.prefill()[0], first[src], rtol=0, atol=1e-5)
        torch.testing.assert_close(alone.step(torch.tensor([tok]))[0], got[row], rtol=0, atol=1e-5)
