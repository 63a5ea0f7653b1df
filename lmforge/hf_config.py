"""HuggingFace config.json <-> ModelConfig, for model_type llama, qwen2, glm and glm4.

A key missing from a config.json means transformers' class default for that model_type, so those
defaults are spelled out below. Both RoPE styles are read: transformers >= 5 writes `rope_parameters`,
older files `rope_theta` + `rope_scaling` (whose `type` is an alias of `rope_type`).
"""

from __future__ import annotations

from typing import Any

from lmforge.config import FAMILIES, ModelConfig, RopeScaling
from lmforge.errors import LmforgeError

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "glm": "GlmForCausalLM",
    "glm4": "Glm4ForCausalLM",
}

_GLM_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151552,
    "hidden_size": 4096,
    "intermediate_size": 13696,
    "num_hidden_layers": 40,
    "num_attention_heads": 32,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1.5625e-7,
    "pad_token_id": 151329,
    "eos_token_id": [151329, 151336, 151338],
    "bos_token_id": None,
    "attention_bias": True,
    "partial_rotary_factor": 0.5,
}
# transformers' configuration_{llama,qwen2,glm,glm4}.py class defaults
DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": None,
        "head_dim": None,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "pad_token_id": None,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "attention_bias": False,
        "mlp_bias": False,
    },
    "qwen2": {
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 22016,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "head_dim": None,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "pad_token_id": None,
        "bos_token_id": None,
        "eos_token_id": None,
    },
    "glm": _GLM_DEFAULTS,
    "glm4": _GLM_DEFAULTS,
}

_TORCH_DTYPES = {
    "float32": "float32",
    "bfloat16": "bfloat16",
    "float16": "float16",
    "fp32": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "float": "float32",
    "half": "float16",
}


def _rope_from_hf(hf: dict[str, Any], family: str) -> tuple[float, float, RopeScaling | None]:
    """(theta, partial_rotary_factor, scaling) from either config.json style, as transformers reads it."""
    # transformers: `rope_scaling`, when present, takes the place of `rope_parameters`.
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise LmforgeError("per-layer-type rope_parameters are not supported by llama/qwen2/glm/glm4 checkpoints.")
    if "type" in params:
        params.setdefault("rope_type", params.pop("type"))
    theta = params.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
    partial = params.pop("partial_rotary_factor", None)
    if partial is None:
        partial = hf.get("partial_rotary_factor", DEFAULTS[family].get("partial_rotary_factor", 1.0))
    rope_type = params.pop("rope_type", "default")
    if rope_type in ("llama3", "yarn", "longrope"):
        if "original_max_position_embeddings" in hf:
            params["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
        params.setdefault("original_max_position_embeddings", _get(hf, family, "max_position_embeddings"))
    try:
        theta, partial = float(theta), float(partial)
        if rope_type == "default":
            return theta, partial, None
        return theta, partial, RopeScaling.from_dict({"rope_type": rope_type, **params})
    except (TypeError, ValueError) as e:
        raise LmforgeError(f"config.json rope settings are invalid ({e}); fix rope_theta / rope_parameters.") from None


def _get(hf: dict[str, Any], family: str, key: str) -> Any:
    return hf[key] if key in hf else DEFAULTS[family].get(key)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a config.json dict; values transformers would use for missing keys."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise LmforgeError(
            f"unsupported model_type {family!r} in config.json; lmforge reads {', '.join(FAMILIES)} "
            "(Llama 3, Qwen 2.5, GLM-4 and GLM-4-0414 checkpoints)."
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise LmforgeError(f"hidden_act {act!r} is not supported; these families use 'silu'.")
    if hf.get("quantization_config"):
        raise LmforgeError("quantized checkpoints (quantization_config) are not supported yet; use bf16/fp32 weights.")
    if family == "qwen2" and hf.get("use_sliding_window"):
        raise LmforgeError("use_sliding_window=true is not supported; Qwen 2.5 checkpoints leave it false.")

    def get(key: str) -> Any:
        return _get(hf, family, key)

    heads = get("num_attention_heads")
    theta, partial, scaling = _rope_from_hf(hf, family)
    eos = get("eos_token_id")
    eos = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
    bias = bool(get("attention_bias")) if family != "qwen2" else True
    dtype = _TORCH_DTYPES.get(str(hf.get("dtype") or hf.get("torch_dtype") or "float32"), "float32")
    try:
        return ModelConfig(
            vocab_size=get("vocab_size"),
            hidden_size=get("hidden_size"),
            num_layers=get("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=get("num_key_value_heads") or heads,
            intermediate_size=get("intermediate_size"),
            head_dim=get("head_dim") or 0,
            norm_eps=float(get("rms_norm_eps")),
            rope_theta=theta,
            rope_scaling=scaling,
            partial_rotary_factor=partial,
            rope_interleaved=family in ("glm", "glm4"),
            qkv_bias=bias,
            o_bias=bias if family == "llama" else False,
            mlp_bias=bool(hf.get("mlp_bias", False)) if family == "llama" else False,
            post_sublayer_norms=family == "glm4",
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=get("max_position_embeddings"),
            bos_token_id=get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=get("pad_token_id"),
            family=family,
            initializer_range=float(hf.get("initializer_range", 0.02)),
            dtype=dtype,
        )
    except TypeError as e:
        raise LmforgeError(f"config.json has a value of the wrong type ({e}); fix config.json.") from None


def config_to_hf(c: ModelConfig) -> dict[str, Any]:
    """A config.json dict that transformers (>= 4.45, incl. 5.x) and vLLM read as the same model."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling is not None:
        rope.update(c.rope_scaling.to_dict())
    if c.partial_rotary_factor != 1.0:
        rope["partial_rotary_factor"] = c.partial_rotary_factor
    eos: int | list[int] | None = list(c.eos_token_id) if len(c.eos_token_id) != 1 else c.eos_token_id[0]
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[c.family]],
        "model_type": c.family,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.norm_eps,
        "initializer_range": c.initializer_range,
        "tie_word_embeddings": c.tie_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": eos if c.eos_token_id else None,
        "pad_token_id": c.pad_token_id,
        "rope_theta": c.rope_theta,  # older readers (transformers 4.x, llama.cpp's converter)
        "rope_parameters": rope,
        "attention_dropout": 0.0,
        "use_cache": True,
        "dtype": c.dtype,
    }
    if c.rope_scaling is not None:
        out["rope_scaling"] = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if c.family == "llama":
        out["attention_bias"] = c.qkv_bias
        out["mlp_bias"] = c.mlp_bias
    elif c.family == "qwen2":
        out["use_sliding_window"] = False
        out["sliding_window"] = None
        out["max_window_layers"] = c.num_layers
    else:
        out["attention_bias"] = c.qkv_bias
        out["partial_rotary_factor"] = c.partial_rotary_factor
    return out
