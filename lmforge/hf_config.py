"""HuggingFace config.json <-> ModelConfig, for model_type llama, qwen2, glm and glm4.

A key missing from a config.json means transformers' class default for that model_type, so those
defaults are spelled out below. Both RoPE styles are read: transformers >= 5 writes `rope_parameters`,
older files `rope_theta` + `rope_scaling` (whose `type` is an alias of `rope_type`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmforge.config import (
    FAMILIES,
    ModelConfig,
    RopeScaling,
    check_bool,
    check_int,
    check_number,
    check_token_id,
    shown,
)
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


def json_type(value: Any) -> str:
    """What a parsed JSON value is, in JSON's words (array, string, number, ...)."""
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _in_config_json(check: Callable[..., Any], key: str, value: Any, **kw: Any) -> Any:
    """check(key, value) with the error saying that the value is config.json's."""
    try:
        return check(key, value, **kw)
    except LmforgeError as e:
        raise LmforgeError(f"config.json: {e}") from None


def _rope_from_hf(hf: dict[str, Any], family: str) -> tuple[float, float, RopeScaling | None]:
    """(theta, partial_rotary_factor, scaling) from either config.json style, as transformers reads it."""
    # transformers: `rope_scaling`, when present, takes the place of `rope_parameters`.
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    raw = hf.get(key) or {}
    if not isinstance(raw, dict):
        raise LmforgeError(
            f'config.json: {key} must be a JSON object such as {{"rope_type": "default", "rope_theta": 10000.0}}, '
            f"got {shown(raw)}."
        )
    params = dict(raw)
    nested = [k for k, v in params.items() if isinstance(v, dict)]
    if nested:
        raise LmforgeError(
            f"config.json: {key}.{nested[0]} is an object; per-layer-type rope parameters are not supported by "
            "llama/qwen2/glm/glm4 checkpoints: give one flat object of rope parameters."
        )
    if "type" in params:
        params.setdefault("rope_type", params.pop("type"))
    # A null counts as absent (transformers' setdefault leaves a null in place, then reads the default).
    theta = params.pop("rope_theta", None)
    if theta is None:
        theta = hf.get("rope_theta")
    if theta is None:
        theta = 10000.0
    partial = params.pop("partial_rotary_factor", None)
    if partial is None:
        partial = hf.get("partial_rotary_factor", DEFAULTS[family].get("partial_rotary_factor", 1.0))
    if not (isinstance(partial, int | float) and not isinstance(partial, bool) and 0 < partial <= 1):
        raise LmforgeError(
            f"config.json: partial_rotary_factor (top level or in rope_parameters) must be a number in (0, 1], "
            f"got {shown(partial)}."
        )
    theta = _in_config_json(check_number, "rope_theta", theta, above=1)
    rope_type = params.pop("rope_type", "default")
    if rope_type in ("llama3", "yarn", "longrope"):
        if "original_max_position_embeddings" in hf:
            params["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
        params.setdefault("original_max_position_embeddings", _get(hf, family, "max_position_embeddings"))
    if rope_type == "default":
        return theta, float(partial), None
    try:
        return theta, float(partial), RopeScaling.from_dict({"rope_type": rope_type, **params})
    except LmforgeError as e:
        raise LmforgeError(f"config.json: {key}: {e}") from None


def _get(hf: dict[str, Any], family: str, key: str) -> Any:
    return hf[key] if key in hf else DEFAULTS[family].get(key)


def _eos_from_hf(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    for tok in items:
        if not isinstance(tok, int) or isinstance(tok, bool):
            raise LmforgeError(
                f"config.json: eos_token_id must be an integer, a list of integers or null, got {shown(value)}."
            )
    return tuple(items)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a config.json dict; values transformers would use for missing keys.

    Every value is type-checked here with its config.json name, so an error names the key to fix.
    """
    if not isinstance(hf, dict):
        raise LmforgeError(
            f'config.json must hold a JSON object ({{"model_type": ..., ...}}), not a JSON {json_type(hf)}; '
            "is this the checkpoint's config.json?"
        )
    family = hf.get("model_type")
    if not isinstance(family, str) or family not in FAMILIES:
        raise LmforgeError(
            f"unsupported model_type {shown(family)} in config.json; lmforge reads {', '.join(FAMILIES)} "
            "(Llama 3, Qwen 2.5, GLM-4 and GLM-4-0414 checkpoints)."
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise LmforgeError(f"hidden_act {shown(act)} is not supported; these families use 'silu'.")
    quant = hf.get("quantization_config")
    if quant and not (isinstance(quant, dict) and quant.get("quant_method") == "lmforge"):
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        raise LmforgeError(
            f"quantization_config.quant_method {shown(method)} is not supported (lmforge reads its own, written by "
            "`lmforge quantize`); load bf16/fp32 weights, then quantize them with `lmforge quantize`."
        )
    sliding = family == "qwen2" and "use_sliding_window" in hf
    if sliding and _in_config_json(check_bool, "use_sliding_window", hf["use_sliding_window"]):
        raise LmforgeError("use_sliding_window=true is not supported; Qwen 2.5 checkpoints leave it false.")

    def get(key: str) -> Any:
        return _get(hf, family, key)

    def integer(key: str, hint: str = "") -> int:
        return _in_config_json(check_int, key, get(key), hint=hint)

    def flag(key: str, default: bool = False) -> bool:
        return _in_config_json(check_bool, key, hf.get(key, default))

    heads = integer("num_attention_heads")
    # transformers reads a null num_key_value_heads / head_dim as "derive it"; 0 is not absent but wrong.
    kv = (
        integer("num_key_value_heads", "null means one per attention head")
        if get("num_key_value_heads") is not None
        else heads
    )
    head_dim = 0 if get("head_dim") is None else integer("head_dim", "null means hidden_size // num_attention_heads")
    theta, partial, scaling = _rope_from_hf(hf, family)
    bias = flag("attention_bias", bool(DEFAULTS[family].get("attention_bias"))) if family != "qwen2" else True
    dtype = _TORCH_DTYPES.get(str(hf.get("dtype") or hf.get("torch_dtype") or "float32"), "float32")
    return ModelConfig(
        vocab_size=integer("vocab_size"),
        hidden_size=integer("hidden_size"),
        num_layers=integer("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv,
        intermediate_size=integer("intermediate_size"),
        head_dim=head_dim,
        norm_eps=_in_config_json(check_number, "rms_norm_eps", get("rms_norm_eps"), above=0),
        rope_theta=theta,
        rope_scaling=scaling,
        partial_rotary_factor=partial,
        rope_interleaved=family in ("glm", "glm4"),
        qkv_bias=bias,
        o_bias=bias if family == "llama" else False,
        mlp_bias=flag("mlp_bias") if family == "llama" else False,
        post_sublayer_norms=family == "glm4",
        tie_embeddings=flag("tie_word_embeddings"),
        max_position_embeddings=integer("max_position_embeddings"),
        bos_token_id=_in_config_json(check_token_id, "bos_token_id", get("bos_token_id")),
        eos_token_id=_eos_from_hf(get("eos_token_id")),
        pad_token_id=_in_config_json(check_token_id, "pad_token_id", get("pad_token_id")),
        family=family,
        initializer_range=_in_config_json(
            check_number, "initializer_range", hf.get("initializer_range", 0.02), at_least=0
        ),
        dtype=dtype,
    )


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
