"""Presets: the published checkpoints' configs (REFERENCE.md section 2), each with its source.

The numbers are those of each repository's config.json; `tests/test_presets.py` checks every preset's
parameter count against the reference table. The `tiny-*` presets are for tests and demos.
"""

from __future__ import annotations

from lmforge.config import ModelConfig, RopeScaling


def _llama3(
    repo: str, h: int, ffn: int, layers: int, heads: int, factor: float | None, tied: bool, max_pos: int
) -> ModelConfig:
    scaling = (
        RopeScaling(
            "llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
        )
        if factor
        else None
    )
    return ModelConfig(
        vocab_size=128256,
        hidden_size=h,
        intermediate_size=ffn,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=8,
        head_dim=h // heads,
        norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=scaling,
        tie_embeddings=tied,
        max_position_embeddings=max_pos,
        bos_token_id=128000,
        eos_token_id=(128001,),
        family="llama",
        dtype="bfloat16",
        source=f"https://huggingface.co/{repo}/blob/main/config.json",
    )


def _qwen25(
    repo: str, h: int, ffn: int, layers: int, heads: int, kv: int, vocab: int, eps: float, tied: bool, max_pos: int
) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=h,
        intermediate_size=ffn,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        norm_eps=eps,
        rope_theta=1000000.0,
        qkv_bias=True,
        tie_embeddings=tied,
        max_position_embeddings=max_pos,
        bos_token_id=151643,
        eos_token_id=(151643,),
        family="qwen2",
        dtype="bfloat16",
        source=f"https://huggingface.co/{repo}/blob/main/config.json",
    )


def _glm4(
    repo: str, h: int, ffn: int, layers: int, heads: int, eps: float, qkv_bias: bool, family: str, max_pos: int
) -> ModelConfig:
    return ModelConfig(
        vocab_size=151552,
        hidden_size=h,
        intermediate_size=ffn,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=2,
        head_dim=128,
        norm_eps=eps,
        rope_theta=10000.0,
        partial_rotary_factor=0.5,
        rope_interleaved=True,
        qkv_bias=qkv_bias,
        post_sublayer_norms=family == "glm4",
        max_position_embeddings=max_pos,
        eos_token_id=(151329, 151336, 151338),
        pad_token_id=151329,
        family=family,
        dtype="bfloat16",
        source=f"https://huggingface.co/{repo}/blob/main/config.json",
    )


def _tiny(family: str, **kw) -> ModelConfig:
    base = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=256,
        family=family,
        source="lmforge debug preset (random weights)",
    )
    base.update(kw)
    return ModelConfig(**base)


PRESETS: dict[str, ModelConfig] = {
    "llama-3.2-1b": _llama3("meta-llama/Llama-3.2-1B", 2048, 8192, 16, 32, 32.0, True, 131072),
    "llama-3.2-3b": _llama3("meta-llama/Llama-3.2-3B", 3072, 8192, 28, 24, 32.0, True, 131072),
    "llama-3.1-8b": _llama3("meta-llama/Llama-3.1-8B", 4096, 14336, 32, 32, 8.0, False, 131072),
    "llama-3-70b": _llama3("meta-llama/Meta-Llama-3-70B", 8192, 28672, 80, 64, None, False, 8192),
    "qwen2.5-0.5b": _qwen25("Qwen/Qwen2.5-0.5B", 896, 4864, 24, 14, 2, 151936, 1e-6, True, 32768),
    "qwen2.5-1.5b": _qwen25("Qwen/Qwen2.5-1.5B", 1536, 8960, 28, 12, 2, 151936, 1e-6, True, 131072),
    "qwen2.5-3b": _qwen25("Qwen/Qwen2.5-3B", 2048, 11008, 36, 16, 2, 151936, 1e-6, True, 32768),
    "qwen2.5-7b": _qwen25("Qwen/Qwen2.5-7B", 3584, 18944, 28, 28, 4, 152064, 1e-6, False, 131072),
    "qwen2.5-14b": _qwen25("Qwen/Qwen2.5-14B", 5120, 13824, 48, 40, 8, 152064, 1e-5, False, 131072),
    "qwen2.5-32b": _qwen25("Qwen/Qwen2.5-32B", 5120, 27648, 64, 40, 8, 152064, 1e-5, False, 131072),
    "qwen2.5-72b": _qwen25("Qwen/Qwen2.5-72B", 8192, 29568, 80, 64, 8, 152064, 1e-5, False, 131072),
    "glm-4-9b": _glm4("THUDM/glm-4-9b-hf", 4096, 13696, 40, 32, 1.5625e-7, True, "glm", 8192),
    "glm-4-9b-0414": _glm4("THUDM/GLM-4-9B-0414", 4096, 13696, 40, 32, 1e-5, True, "glm4", 32768),
    "glm-4-32b-0414": _glm4("THUDM/GLM-4-32B-0414", 6144, 23040, 61, 48, 1e-5, False, "glm4", 32768),
    # Debug presets: same knobs as each family, tiny sizes.
    "tiny-llama": _tiny(
        "llama",
        tie_embeddings=True,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(
            "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
        ),
    ),
    "tiny-qwen2": _tiny("qwen2", qkv_bias=True, tie_embeddings=True, rope_theta=1000000.0, norm_eps=1e-6),
    "tiny-glm": _tiny(
        "glm",
        head_dim=32,
        qkv_bias=True,
        partial_rotary_factor=0.5,
        rope_interleaved=True,
        pad_token_id=0,
        norm_eps=1.5625e-7,
    ),
    "tiny-glm4": _tiny(
        "glm4",
        head_dim=32,
        qkv_bias=True,
        partial_rotary_factor=0.5,
        rope_interleaved=True,
        post_sublayer_norms=True,
        pad_token_id=0,
    ),
}
