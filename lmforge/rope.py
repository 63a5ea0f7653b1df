"""Rotary position embeddings (Su et al. 2021, arXiv 2104.09864) and their scaling variants.

Frequencies are computed in fp32 with the same expressions as transformers' `modeling_rope_utils.py`,
so that cos/sin (and therefore logits) match the reference bit for bit; REFERENCE.md section 1 has the
formulas. Two layouts exist: Llama/Qwen rotate the two halves of the head against each other
("rotate-half"), GLM rotates adjacent pairs (0,1),(2,3),... and only the first `rotary_dim` dims.

2D positions (GLM's blank-infilling objective, Du et al. 2022, arXiv 2103.10360, "2D positional encoding"):
position_ids [B, T, 2] carry position #1 (where a token is in the corrupted text, Part A) and position #2
(0 in Part A, 1.. inside a generated span). The R rotary dims are then split into two halves of R/2; each
half gets its own complete frequency table for dimension R/2 (f_i = theta^(-2i/(R/2)), i < R/4, with the
config's scaling applied at dimension R/2), the first half is rotated by position #1 and the second by
position #2, and each half keeps the config's layout (interleaved pairs, or rotate-half within the half).
This is the 2D RoPE of GLM's later releases (GLM-130B, ChatGLM): each id gets a full RoPE of half the
width, so both are encoded as relative offsets. With [B, T] or [T] positions nothing of this applies: the
one-dimensional code path (and its bit-exact match with transformers) is untouched. A model trained with
2D positions must be run with 2D positions (lmforge.generate.infill); the checkpoint does not record it.

Shape letters: B batch, T tokens, N heads, D head_dim, R rotary dim.
"""

from __future__ import annotations

import math

import torch

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError


def _exponents(dim: int, device: torch.device | None) -> torch.Tensor:
    """2i/dim for i < dim/2, fp32, built the way the reference builds it."""
    return torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim


def rope_frequencies(
    config: ModelConfig, seq_len: int | None = None, device: torch.device | None = None, dim: int | None = None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] (fp32) and the cos/sin multiplier, for sequences of `seq_len` tokens.

    `seq_len` matters only for the length-dependent variants (dynamic NTK and longrope). `dim` defaults to
    the rotary dim R; 2D positions use R/2 (one table per half, see the module docstring).
    """
    base, s = config.rope_theta, config.rope_scaling
    dim = config.rotary_dim if dim is None else dim
    if s is None:
        return 1.0 / (base ** _exponents(dim, device)), 1.0

    if s.rope_type == "linear":
        return 1.0 / (base ** _exponents(dim, device)) / s.factor, 1.0

    if s.rope_type == "dynamic":
        # NTK-aware base stretch once the sequence outgrows max_position_embeddings. Above the limit the
        # reference computes the new base in fp32 tensor arithmetic; we do the same to match it exactly.
        max_pos = config.max_position_embeddings
        if seq_len is not None and seq_len > max_pos:
            seq = torch.tensor(seq_len, device=device)
            base = base * ((s.factor * seq / max_pos) - (s.factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base ** _exponents(dim, device)), 1.0

    if s.rope_type == "llama3":
        inv_freq = 1.0 / (base ** _exponents(dim, device))
        orig = s.original_max_position_embeddings
        low_wavelen = orig / s.low_freq_factor
        high_wavelen = orig / s.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are interpolated by `factor`, short ones kept, the band between blended.
        scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
        smooth = (orig / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled), 1.0

    if s.rope_type == "yarn":
        return _yarn(config, device, dim)

    assert s.rope_type == "longrope", s.rope_type
    if dim != config.rotary_dim:
        raise LmforgeError(
            "longrope lists one factor per rotary frequency, so it has no table for 2D (GLM) positions; "
            "use another rope scaling (or none) for a model trained with the GLM objective."
        )
    orig = s.original_max_position_embeddings
    factor = s.factor if s.factor is not None else config.max_position_embeddings / orig
    attention_factor = s.attention_factor
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    ext = s.long_factor if seq_len is not None and seq_len > orig else s.short_factor
    ext_t = torch.tensor(ext, dtype=torch.float32, device=device)
    return 1.0 / (ext_t * base ** _exponents(dim, device)), attention_factor


def _yarn(config: ModelConfig, device: torch.device | None, dim: int) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023, arXiv 2309.00071): interpolate low frequencies, keep high ones."""
    s = config.rope_scaling
    assert s is not None
    base, factor = config.rope_theta, s.factor
    orig = s.original_max_position_embeddings

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.attention_factor
    if attention_factor is None:
        if s.mscale and s.mscale_all_dim:
            attention_factor = float(mscale(factor, s.mscale) / mscale(factor, s.mscale_all_dim))
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(s.beta_fast or 32), correction_dim(s.beta_slow or 1)
    if s.truncate is None or s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the reference's guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1).to(device)

    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor


class RotaryEmbedding:
    """cos/sin tables for given positions. Not an nn.Module on purpose: the fp32 frequencies must not be
    cast by `model.to(torch.bfloat16)` (a bf16 inv_freq changes results), so they live outside the
    module's buffers and are recomputed for whichever device the activations are on."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.length_dependent = config.rope_scaling is not None and config.rope_scaling.rope_type in (
            "dynamic",
            "longrope",
        )
        self._cache: dict[tuple[torch.device, int | None, int], tuple[torch.Tensor, float]] = {}

    def _frequencies(self, position_ids: torch.Tensor, dim: int) -> tuple[torch.Tensor, float]:
        seq_len = None
        if self.length_dependent:
            seq_len = int(position_ids.max()) + 1
            s = self.config.rope_scaling
            assert s is not None
            # Only whether the limit is exceeded matters for longrope; dynamic depends on the exact length.
            limit = (
                s.original_max_position_embeddings
                if s.rope_type == "longrope"
                else (self.config.max_position_embeddings)
            )
            if seq_len <= limit:
                seq_len = None
            elif s.rope_type == "longrope":
                seq_len = limit + 1
        key = (position_ids.device, seq_len, dim)
        if key not in self._cache:
            if len(self._cache) > 8:
                self._cache.clear()
            self._cache[key] = rope_frequencies(self.config, seq_len, position_ids.device, dim)
        return self._cache[key]

    def __call__(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, T] -> cos, signed sin [B, 1, T, R] in `dtype`, laid out for `apply_rope`;
        2D position_ids [B, T, 2] -> cos, signed sin [B, 1, T, 2, R/2] (one table per half of R).

        The sin table carries the sign of the rotation (-sin on the dims that receive the negated
        partner), computed once per forward for every layer, q and k; -(a*b) == a*(-b) exactly, so the
        results are bit-identical to rotating with negated inputs as the reference does."""
        dim = self.config.rotary_dim
        if position_ids.dim() == 3:  # GLM 2D positions: each half of R is a full RoPE of width R/2
            if position_ids.shape[-1] != 2:
                raise LmforgeError(f"2D position_ids must be [B, T, 2], got {list(position_ids.shape)}.")
            dim //= 2
            if dim % 2:
                raise LmforgeError(
                    f"2D (GLM) positions split the rotary dims in two halves of rotated pairs, so the rotary dim "
                    f"(head_dim * partial_rotary_factor = {self.config.rotary_dim}) must be a multiple of 4."
                )
        inv_freq, scale = self._frequencies(position_ids, dim)
        freqs = position_ids[..., None].float() * inv_freq  # [B, T, R/2], or [B, T, 2, R/4] for 2D
        cos, sin = freqs.cos(), freqs.sin()
        if scale != 1.0:
            cos, sin = cos * scale, sin * scale
        cos, sin = cos.to(dtype), sin.to(dtype)
        if self.config.rope_interleaved:  # pair i = dims (2i, 2i+1) uses frequency i
            cos = cos.repeat_interleave(2, dim=-1)
            sin = torch.stack((-sin, sin), dim=-1).flatten(-2)
        else:  # dim i pairs with dim i + R/2 (within each half for 2D)
            cos = torch.cat((cos, cos), dim=-1)
            sin = torch.cat((-sin, sin), dim=-1)
        return cos[:, None], sin[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the first R dims of x [B, N, T, D] by cos / signed sin [B, 1, T, R] (see RotaryEmbedding).

    With 2D tables [B, 1, T, 2, R/2] the R dims are viewed as two halves, each rotated with the layout."""
    two_d = cos.dim() == 5
    rot_dim = cos.shape[-1] * (2 if two_d else 1)
    partial = rot_dim < x.shape[-1]
    x_rot = x[..., :rot_dim] if partial else x
    if two_d:
        x_rot = x_rot.unflatten(-1, (2, -1))  # [B, N, T, 2, R/2]
    if interleaved:
        swapped = x_rot.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0, x3, x2, ...)
    else:
        x1, x2 = x_rot.chunk(2, dim=-1)
        swapped = torch.cat((x2, x1), dim=-1)
    out = x_rot * cos + swapped * sin
    if two_d:
        out = out.flatten(-2)  # [B, N, T, R]
    return torch.cat((out, x[..., rot_dim:]), dim=-1) if partial else out
