"""GGUF metadata <-> ModelConfig for llama, qwen2 and glm4, under llama.cpp's key names (gguf.Keys).

What llama.cpp reads: `{arch}.context_length`, `embedding_length`, `block_count`, `feed_forward_length`,
`attention.head_count(_kv)`, `attention.key_length` / `value_length` (head_dim), `attention.layer_norm_rms_epsilon`,
`rope.freq_base`, `rope.dimension_count` (the rotary dim: head_dim for llama and qwen2, head_dim *
partial_rotary_factor for GLM-4), `rope.scaling.type` / `factor` for linear scaling, and for Llama 3 scaling
a `rope_freqs` tensor of per-frequency divisors that only llama.cpp's llama graph applies. Whatever the
file does not say (biases, tied head, vocabulary size) is read from its tensors.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from lmforge.checkpoint.gguf_names import GGUF_ARCHS, import_gguf
from lmforge.config import ModelConfig, RopeScaling
from lmforge.errors import LmforgeError


def _short(x: float) -> float:
    """The shortest decimal that rounds to the same float32: GGUF stores float32, config.json wants 1e-05."""
    return float(str(np.float32(x)))


# --- writing -----------------------------------------------------------------------------------------
def write_config(writer: Any, config: ModelConfig) -> None:
    """The hyperparameters llama.cpp reads for `config.family`'s architecture."""
    gguf = import_gguf()
    c = config
    writer.add_vocab_size(c.vocab_size)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_heads)
    writer.add_head_count_kv(c.num_kv_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_rope_dimension_count(c.rotary_dim)
    s = c.rope_scaling
    if s is not None and s.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(s.factor)
    elif s is not None and not (s.rope_type == "llama3" and c.family == "llama"):
        where = "for llama only (as a rope_freqs tensor)" if s.rope_type == "llama3" else "in GGUF"
        raise LmforgeError(
            f"rope scaling {s.rope_type!r} has no llama.cpp form lmforge writes {where}; GGUF export supports no "
            "scaling, linear, and llama3 for llama models."
        )


def rope_freqs(config: ModelConfig) -> torch.Tensor | None:
    """llama.cpp's `rope_freqs` [rotary_dim/2] (fp32) for Llama 3 scaling, else None.

    llama.cpp divides each base frequency theta^(-2i/d) by its factor, so the factor is base / scaled.
    """
    from lmforge.rope import rope_frequencies

    if config.rope_scaling is None or config.rope_scaling.rope_type != "llama3":
        return None
    scaled, _ = rope_frequencies(config)
    base, _ = rope_frequencies(config.replace(rope_scaling=None))
    return (base / scaled).to(torch.float32)


# --- reading -----------------------------------------------------------------------------------------
def config_from_gguf(
    meta: dict[str, Any], shapes: dict[str, tuple[int, ...]], factors: np.ndarray | None, source: str
) -> ModelConfig:
    """ModelConfig from a GGUF file's metadata, its tensor shapes (numpy order) and its rope_freqs, if any."""
    gguf = import_gguf()
    arch = meta.get(gguf.Keys.General.ARCHITECTURE)
    family = {a: f for f, a in GGUF_ARCHS.items()}.get(arch)
    if family is None:
        raise LmforgeError(
            f"{source}: GGUF architecture {arch!r} is not supported; lmforge reads {', '.join(GGUF_ARCHS.values())}."
        )

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(key.format(arch=arch), default)
        if value is None:
            raise LmforgeError(f"{source}: the GGUF file lacks {key.format(arch=arch)}; is it complete?")
        return value

    def uniform(key: str, default: Any = None) -> int:
        # llama.cpp allows per-layer lists; one decoder config has one value.
        value = get(key, default)
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise LmforgeError(f"{source}: {key.format(arch=arch)} differs between layers; lmforge has one value.")
            value = value[0]
        return int(value)

    K = gguf.Keys
    hidden, heads = int(get(K.LLM.EMBEDDING_LENGTH)), uniform(K.Attention.HEAD_COUNT)
    head_dim = int(get(K.Attention.KEY_LENGTH, hidden // heads))
    if int(get(K.Attention.VALUE_LENGTH, head_dim)) != head_dim:
        raise LmforgeError(f"{source}: attention key and value lengths differ; lmforge has one head_dim.")
    rot = int(get(K.Rope.DIMENSION_COUNT, head_dim))
    if family != "glm4" and rot != head_dim:
        raise LmforgeError(
            f"{source}: rope.dimension_count {rot} != head_dim {head_dim}; {family} rotates whole heads."
        )
    if "token_embd.weight" not in shapes:
        raise LmforgeError(f"{source}: the GGUF file has no token_embd.weight; it is not a complete model.")

    def has(name: str) -> bool:
        return f"blk.0.{name}" in shapes

    tok = K.Tokenizer
    eos = tuple(dict.fromkeys(int(meta[k]) for k in (tok.EOS_ID, tok.EOT_ID, tok.EOM_ID) if k in meta))
    fields: dict[str, Any] = dict(
        vocab_size=shapes["token_embd.weight"][0],
        hidden_size=hidden,
        num_layers=int(get(K.LLM.BLOCK_COUNT)),
        num_heads=heads,
        num_kv_heads=uniform(K.Attention.HEAD_COUNT_KV, heads),
        intermediate_size=uniform(K.LLM.FEED_FORWARD_LENGTH),
        head_dim=head_dim,
        norm_eps=_short(get(K.Attention.LAYERNORM_RMS_EPS)),
        rope_theta=_short(get(K.Rope.FREQ_BASE, 10000.0)),
        partial_rotary_factor=rot / head_dim,
        rope_interleaved=family == "glm4",
        qkv_bias=has("attn_q.bias"),
        o_bias=has("attn_output.bias"),
        mlp_bias=has("ffn_down.bias"),
        post_sublayer_norms=family == "glm4",
        tie_embeddings="output.weight" not in shapes,
        max_position_embeddings=int(get(K.LLM.CONTEXT_LENGTH)),
        bos_token_id=meta.get(tok.BOS_ID),
        eos_token_id=eos,
        pad_token_id=meta.get(tok.PAD_ID),
        family=family,
    )
    try:
        config = ModelConfig(**fields)
        scaling = _scaling(meta, arch, config, factors, source)
        return config.replace(rope_scaling=scaling) if scaling is not None else config
    except LmforgeError as e:
        raise LmforgeError(f"{source}: {e}") from None


def _scaling(
    meta: dict[str, Any], arch: str, config: ModelConfig, factors: np.ndarray | None, source: str
) -> RopeScaling | None:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = meta.get(f"{arch}.rope.scaling.factor", meta.get(f"{arch}.rope.scale_linear"))
    if factors is not None:
        if config.family != "llama" or kind != "none":
            raise LmforgeError("rope_freqs is only read for llama files without another rope scaling")
        return _llama3_from_factors(factors, config)
    if kind == "linear" and factor is not None and factor != 1.0:
        return RopeScaling("linear", factor=_short(factor))
    if kind in ("none", "linear"):
        return None
    raise LmforgeError(f"rope scaling {kind!r} is not supported for GGUF import (supported: none, linear, llama3)")


def _llama3_from_factors(factors: np.ndarray, config: ModelConfig) -> RopeScaling | None:
    """Llama 3 scaling parameters that reproduce a rope_freqs table (checked), or None for all ones.

    The table fixes `factor` and the band where frequencies are blended, s = (orig/w - low)/(high - low)
    for wavelength w; only the ratios of orig, low and high show, so low is taken as Llama 3's 1. With a
    single frequency in the band, high is also taken as Llama 3's 4.
    """
    from lmforge.rope import rope_frequencies

    f = factors.astype(np.float64).reshape(-1)
    base = rope_frequencies(config)[0].double().numpy()
    if f.shape != base.shape:
        raise LmforgeError(f"rope_freqs has {f.size} values; rotary_dim/2 = {base.size} expected")
    if np.allclose(f, 1.0, rtol=1e-6):
        return None
    factor, low, high = _short(f.max()), 1.0, 4.0
    wavelen = 2 * math.pi / base
    ones, full = np.isclose(f, 1.0, rtol=1e-5), np.isclose(f, factor, rtol=1e-5)
    band = ~ones & ~full
    s = (1 / f[band] - 1 / factor) / (1 - 1 / factor)  # from 1/f = (1 - s)/factor + s
    if band.sum() >= 2:
        slope, intercept = np.polyfit(1 / wavelen[band], s, 1)  # s = orig/(high-low) / w - low/(high-low)
        high = float(f"{low - low / intercept:.6g}")
        orig = slope * (high - low)
    elif band.sum() == 1:
        orig = (s[0] * (high - low) + low) * wavelen[band][0]
    else:  # any orig with 1 below orig/high and factor above orig/low gives this table
        above = high * wavelen[ones].max() if ones.any() else 1.0
        orig = math.sqrt(above * low * wavelen[full].min())
    scaling = RopeScaling(
        "llama3",
        factor=factor,
        low_freq_factor=low,
        high_freq_factor=high,
        original_max_position_embeddings=round(orig),
    )
    rebuilt = rope_frequencies(config.replace(rope_scaling=scaling))[0].double().numpy()
    if not np.allclose(rebuilt, base / f, rtol=1e-5, atol=0):
        raise LmforgeError(
            "rope_freqs does not follow Llama 3 scaling (with low_freq_factor 1); lmforge cannot represent it"
        )
    return scaling
