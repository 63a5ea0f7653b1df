"""Logits parity with the installed `transformers` on tiny random models of each family.

Each case builds a random HF model, saves it with `save_pretrained`, loads the directory with
`lmforge.load_pretrained` and compares logits. Cases marked `old_style` rewrite config.json into the
pre-5.0 layout (`rope_theta` + `rope_scaling` with `type`) and the reference is transformers' own reading
of the edited directory.

fp32 logits are bit-identical today; the tests allow 1e-5 absolute (logits here are O(1)).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import edit_config, hf_logits, load_hf, make_hf_model, max_diff, our_logits, random_ids

import lmforge

FP32_ATOL = 1e-5


def old_style(cfg: dict[str, Any], *, keep_partial: bool = True, top_level_orig: bool = False) -> dict[str, Any]:
    """config.json as transformers 4.x wrote it: `rope_theta` (+ `partial_rotary_factor`) at the top level,
    scaling in `rope_scaling` with the `type` alias, no `rope_parameters`."""
    rope = dict(cfg.pop("rope_parameters"))
    cfg.pop("rope_scaling", None)
    cfg["rope_theta"] = rope.pop("rope_theta")
    partial = rope.pop("partial_rotary_factor", None)
    if partial is not None and keep_partial:
        cfg["partial_rotary_factor"] = partial
    rope_type = rope.pop("rope_type")
    if top_level_orig:  # Phi-3 style: the pretraining length next to max_position_embeddings
        cfg["original_max_position_embeddings"] = rope.pop("original_max_position_embeddings")
    if rope_type != "default":
        cfg["rope_scaling"] = {"type": rope_type, **rope}
    return cfg


@dataclass
class Case:
    name: str
    model_type: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    edit: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # rewrite config.json after saving
    expect_rope: str | None = None  # lmforge's reading: rope scaling type (None: unscaled)
    expect_rotary_dim: int = 16
    expect_tied: bool = False


def rope(rope_type: str, theta: float = 10000.0, **kw: Any) -> dict[str, Any]:
    return {"rope_parameters": {"rope_type": rope_type, "rope_theta": theta, **kw}}


GLM_HD = {"head_dim": 16}  # GLM's class default head_dim is 128; keep the tiny models tiny
# longrope needs one factor per frequency: rotary_dim / 2 = 8 for head_dim 16.
SHORT = [1.0 + 0.05 * i for i in range(8)]
LONG = [1.5 + 0.75 * i for i in range(8)]
LONGROPE = dict(short_factor=SHORT, long_factor=LONG, original_max_position_embeddings=32)

CASES = [
    # llama: embeddings, head layouts, biases
    Case("llama-untied-gqa", "llama"),
    Case("llama-tied-mqa", "llama", {"tie_word_embeddings": True, "num_key_value_heads": 1}, expect_tied=True),
    Case("llama-mha-head_dim24", "llama", {"num_key_value_heads": 4, "head_dim": 24}, expect_rotary_dim=24),
    Case("llama-attention_bias-mlp_bias", "llama", {"attention_bias": True, "mlp_bias": True}),
    Case("llama-theta5e5-old", "llama", rope("default", 500000.0), edit=old_style),
    # llama: every rope scaling type, new and old config.json style
    Case("llama-linear", "llama", rope("linear", factor=2.0), expect_rope="linear"),
    Case("llama-linear-old", "llama", rope("linear", factor=2.0), edit=old_style, expect_rope="linear"),
    # dynamic NTK only changes anything beyond max_position_embeddings: 32 < the 37-token batch
    Case(
        "llama-dynamic", "llama", {"max_position_embeddings": 32, **rope("dynamic", factor=2.0)}, expect_rope="dynamic"
    ),
    Case(
        "llama-dynamic-old",
        "llama",
        {"max_position_embeddings": 32, **rope("dynamic", factor=3.0)},
        edit=old_style,
        expect_rope="dynamic",
    ),
    Case("llama-yarn", "llama", rope("yarn", factor=4.0, original_max_position_embeddings=32), expect_rope="yarn"),
    Case(
        "llama-yarn-options",
        "llama",
        rope("yarn", factor=8.0, original_max_position_embeddings=16, beta_fast=16.0, beta_slow=2.0, truncate=False),
        expect_rope="yarn",
    ),
    Case(
        "llama-yarn-mscale",
        "llama",
        rope("yarn", factor=4.0, original_max_position_embeddings=32, mscale=2.0, mscale_all_dim=1.0),
        expect_rope="yarn",
    ),
    Case(
        "llama-yarn-old",
        "llama",
        rope("yarn", factor=4.0, original_max_position_embeddings=32),
        edit=old_style,
        expect_rope="yarn",
    ),
    # orig 64: wavelengths 2*pi/f_i for head_dim 16 are 6.3, 19.9, 62.8, 199, ... so the high-frequency,
    # blended (16 < w < 64) and interpolated bands are all populated.
    Case(
        "llama-llama3",
        "llama",
        rope(
            "llama3",
            500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
        expect_rope="llama3",
    ),
    Case(
        "llama-llama3-old",
        "llama",
        {
            "tie_word_embeddings": True,
            **rope(
                "llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
            ),
        },
        edit=old_style,
        expect_rope="llama3",
        expect_tied=True,
    ),
    # longrope: 37 tokens > original 32 selects long_factor; attention factor from max_pos/orig = 4
    Case("llama-longrope", "llama", rope("longrope", **LONGROPE), expect_rope="longrope"),
    Case(
        "llama-longrope-factor",
        "llama",
        rope("longrope", factor=2.0, **LONGROPE),
        expect_rope="longrope",
    ),
    Case(
        "llama-longrope-old-toplevel-orig",
        "llama",
        rope("longrope", **LONGROPE),
        edit=lambda c: old_style(c, top_level_orig=True),
        expect_rope="longrope",
    ),
    # qwen2: q/k/v bias always on; no head_dim field by default
    Case("qwen2-untied-gqa", "qwen2"),
    Case("qwen2-tied-mqa", "qwen2", {"tie_word_embeddings": True, "num_key_value_heads": 1}, expect_tied=True),
    Case("qwen2-mha-head_dim24", "qwen2", {"num_key_value_heads": 4, "head_dim": 24}, expect_rotary_dim=24),
    Case("qwen2-theta1e6-old", "qwen2", rope("default", 1e6), edit=old_style),
    Case(
        "qwen2-yarn-old",
        "qwen2",
        rope("yarn", 1e6, factor=4.0, original_max_position_embeddings=32),
        edit=old_style,
        expect_rope="yarn",
    ),
    # glm: interleaved rope on the first head_dim * partial_rotary_factor dims
    Case("glm-partial0.5", "glm", {**GLM_HD, "partial_rotary_factor": 0.5}, expect_rotary_dim=8),
    Case("glm-partial0.25-head_dim32", "glm", {"head_dim": 32, "partial_rotary_factor": 0.25}, expect_rotary_dim=8),
    Case(
        "glm-partial0.75-tied-mqa",
        "glm",
        {
            **GLM_HD,
            **rope("default", partial_rotary_factor=0.75),
            "tie_word_embeddings": True,
            "num_key_value_heads": 1,
        },
        expect_rotary_dim=12,
        expect_tied=True,
    ),
    Case("glm-no-bias-mha", "glm", {**GLM_HD, "attention_bias": False, "num_key_value_heads": 4}, expect_rotary_dim=8),
    # config.json without partial_rotary_factor anywhere still means 0.5 for GLM
    Case(
        "glm-omitted-partial-old",
        "glm",
        GLM_HD,
        edit=lambda c: old_style(c, keep_partial=False),
        expect_rotary_dim=8,
    ),
    Case(
        "glm-yarn-partial",
        "glm",
        {"head_dim": 32, **rope("yarn", factor=4.0, original_max_position_embeddings=32)},
        expect_rope="yarn",
    ),
    # glm4: extra post-sublayer norms
    Case("glm4-bias", "glm4", {**GLM_HD, "attention_bias": True}, expect_rotary_dim=8),
    Case("glm4-no-bias", "glm4", {**GLM_HD, "attention_bias": False}, expect_rotary_dim=8),
    Case(
        "glm4-partial1.0-tied-mqa",
        "glm4",
        {**GLM_HD, "partial_rotary_factor": 1.0, "tie_word_embeddings": True, "num_key_value_heads": 1},
        expect_rotary_dim=16,
        expect_tied=True,
    ),
    Case(
        "glm4-head_dim32-partial0.25-old",
        "glm4",
        {"head_dim": 32, "partial_rotary_factor": 0.25},
        edit=old_style,
        expect_rotary_dim=8,
    ),
    Case(
        "glm4-dynamic-partial",
        "glm4",
        {**GLM_HD, "max_position_embeddings": 32, **rope("dynamic", factor=2.0, partial_rotary_factor=0.5)},
        expect_rope="dynamic",
        expect_rotary_dim=8,
    ),
    Case(
        "glm4-linear-old",
        "glm4",
        {"head_dim": 32, **rope("linear", factor=4.0, partial_rotary_factor=0.5)},
        edit=old_style,
        expect_rope="linear",
    ),
]


@dataclass
class Loaded:
    case: Case
    path: Path
    hf: torch.nn.Module  # the reference: transformers' model for this directory
    built: torch.nn.Module  # the in-memory HF model before any config.json edit
    ours: lmforge.Transformer


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def loaded(request, tmp_path_factory) -> Loaded:
    case: Case = request.param
    path = tmp_path_factory.mktemp(case.name)
    built = make_hf_model(case.model_type, path, **case.kwargs)
    if case.edit is not None:
        edit_config(path, case.edit)
        hf = load_hf(path)
    else:
        hf = built
    return Loaded(case, path, hf, built, lmforge.load_pretrained(path))


def test_config_read_like_transformers(loaded: Loaded):
    c, case = loaded.ours.config, loaded.case
    assert c.family == case.model_type
    assert (c.rope_scaling.rope_type if c.rope_scaling else None) == case.expect_rope
    assert c.rotary_dim == case.expect_rotary_dim
    assert c.tie_embeddings == case.expect_tied
    # transformers' rotary table has one frequency per rotated pair
    assert loaded.hf.model.rotary_emb.original_inv_freq.numel() * 2 == c.rotary_dim
    if case.edit is not None:
        # The hand-edited old-style config.json means the same model to transformers.
        assert loaded.hf.config.rope_parameters["rope_type"] == (case.expect_rope or "default")
        ids = random_ids(1, 37, seed=5)
        assert max_diff(hf_logits(loaded.built, ids), hf_logits(loaded.hf, ids)) == 0.0


def test_logits_match(loaded: Loaded, ids: torch.Tensor):
    ref = hf_logits(loaded.hf, ids)
    out = our_logits(loaded.ours, ids)
    assert out.dtype == torch.float32 and out.shape == (3, 37, 300)
    assert max_diff(out, ref) <= FP32_ATOL
    assert ref.std() > 0.1  # logits of a sensible scale, so the tolerance means something


def test_logits_match_across_lengths(loaded: Loaded):
    """Lengths on both sides of max_position_embeddings / the longrope original length, in an order
    that makes transformers grow and then reset its dynamic tables.

    transformers' dynamic-NTK tables depend on history: after a 64-token call, a 40-token call (still
    beyond max_position_embeddings) reuses the 64-token table, where lmforge computes the 40-token one
    (each forward depends only on its own positions). That order is avoided here on purpose."""
    for length in (5, 33, 64, 20, 37):
        ids = random_ids(1, length, seed=length)
        assert max_diff(our_logits(loaded.ours, ids), hf_logits(loaded.hf, ids)) <= FP32_ATOL, length


@pytest.mark.parametrize("side", ["right", "left", "left-positions"])
def test_padded_batch(loaded: Loaded, ids: torch.Tensor, side: str):
    """A 2D attention mask (1 = real token). `left-positions` also passes the position ids that
    generation derives from a left-padded mask, so each row's real tokens start at position 0."""
    lengths = [37, 30, 21]
    mask = torch.zeros(3, 37, dtype=torch.long)
    for b, n in enumerate(lengths):
        if side == "right":
            mask[b, :n] = 1
        else:
            mask[b, 37 - n :] = 1
    kw = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)} if side == "left-positions" else {}
    ref = hf_logits(loaded.hf, ids, attention_mask=mask, **kw)
    out = our_logits(loaded.ours, ids, attention_mask=mask, **kw)
    real = mask.bool()
    assert torch.isfinite(out[real]).all()
    assert max_diff(out[real], ref[real]) <= FP32_ATOL
    if side == "right":
        # Causal attention never sees right padding: real tokens are as without a mask.
        assert max_diff(out[real], hf_logits(loaded.hf, ids)[real]) <= FP32_ATOL
    elif side == "left":
        # Left padding sits before the real tokens: the mask changes the padded rows.
        unmasked = hf_logits(loaded.hf, ids)
        assert max_diff(out[1:][real[1:]], unmasked[1:][real[1:]]) > 1e-3
    elif loaded.case.expect_rope not in ("dynamic", "longrope"):
        # With mask-derived positions a left-padded row is its sequence alone (length-dependent rope
        # excepted: its tables follow the longest row).
        assert max_diff(out[2, 16:], hf_logits(loaded.hf, ids[2:, 16:])[0]) <= FP32_ATOL


def test_packed_sequences(loaded: Loaded, ids: torch.Tensor):
    """position_ids with resets and no mask: block-diagonal causal attention, as transformers builds it."""

    def segments(*lengths: int) -> torch.Tensor:
        return torch.cat([torch.arange(n) for n in lengths])

    position_ids = torch.stack([segments(12, 15, 10), segments(37), segments(20, 17)])
    ref = hf_logits(loaded.hf, ids, position_ids=position_ids)
    out = our_logits(loaded.ours, ids, position_ids=position_ids)
    assert max_diff(out, ref) <= FP32_ATOL
    # The document boundaries are honoured: a packed document's logits equal its forward alone
    # (transformers on the lone segment; not for length-dependent rope, whose tables follow the longest
    # position in the batch), and differ from plain causal attention over the packed row.
    if loaded.case.expect_rope not in ("dynamic", "longrope"):
        alone = hf_logits(loaded.hf, ids[:1, 12:27])
        assert max_diff(out[:1, 12:27], alone) <= FP32_ATOL
    causal = hf_logits(loaded.hf, ids, position_ids=torch.arange(37).expand(3, 37))
    assert max_diff(out[0, 12:], causal[0, 12:]) > 1e-3


# bf16 tolerance. bf16 keeps 8 significand bits: eps = 2^-8 ~ 0.0039, one rounding is up to eps/2 relative.
# Measured on every case above (batch 3 x 37, logits std ~0.8, max |logit| ~3.1-3.8): lmforge's bf16 logits
# are bit-identical to transformers' bf16 logits (max abs diff 0.0, argmax agreement 100%), while both
# differ from fp32 by 0.044-0.083 (~4-6 eps of the logit scale), so the bf16 run is really bf16.
# Known bf16 precision mistakes were measured too, by patching lmforge: inv_freq rounded to bf16 gives
# 2.9-3.5 eps * max|logit|, RMSNorm multiplying by the weight before the cast back gives 3.9-4.1 eps, rope
# angles computed in bf16 3.1-4.6 eps, with argmax still agreeing on 96-100% of positions.
# The tolerance is 1 eps * max|logit| (~0.013 here): two bf16 roundings of the largest logit, room for a
# harmless reordering of one op, and still 3x below the smallest of those mistakes
# (test_bf16_tolerance_catches_precision_mistakes checks that it would catch one). Argmax must agree on
# >= 97% of positions (a rank change needs two logits within a rounding of each other).
BF16_EPS = 2.0**-8
BF16_REL_TOL = 1 * BF16_EPS


def bf16_diff(ours: lmforge.Transformer, hf16: torch.nn.Module, ids: torch.Tensor) -> tuple[float, float, float]:
    """(max abs diff, max |logit| of the reference, argmax agreement) of bf16 logits."""
    ref = hf_logits(hf16, ids).float()
    out = our_logits(ours, ids).float()
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return max_diff(out, ref), ref.abs().max().item(), agree


def test_bf16_close_to_transformers_bf16(loaded: Loaded, ids: torch.Tensor):
    hf16 = load_hf(loaded.path, dtype=torch.bfloat16)
    ours16 = lmforge.load_pretrained(loaded.path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours16.parameters())
    assert our_logits(ours16, ids).dtype == torch.bfloat16
    diff, scale, agree = bf16_diff(ours16, hf16, ids)
    assert diff <= BF16_REL_TOL * scale, (diff, scale)
    assert agree >= 0.97, agree
    # bf16 really is lower precision than fp32 here (the comparison is not vacuous)
    assert max_diff(our_logits(ours16, ids), hf_logits(loaded.hf, ids)) > 1e-3


def test_bf16_tolerance_catches_precision_mistakes(tmp_path: Path, ids: torch.Tensor, monkeypatch):
    """The bf16 tolerance is tight enough to see a bf16 inv_freq (REFERENCE.md: keep it fp32)."""
    import lmforge.rope

    make_hf_model("llama", tmp_path, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    hf16 = load_hf(tmp_path, dtype=torch.bfloat16)
    real = lmforge.rope.rope_frequencies

    def bf16_inv_freq(*args, **kwargs):
        inv_freq, scale = real(*args, **kwargs)
        return inv_freq.to(torch.bfloat16).float(), scale

    monkeypatch.setattr(lmforge.rope, "rope_frequencies", bf16_inv_freq)
    diff, scale, _ = bf16_diff(lmforge.load_pretrained(tmp_path, dtype=torch.bfloat16), hf16, ids)
    assert diff > 2 * BF16_REL_TOL * scale, (diff, scale)
