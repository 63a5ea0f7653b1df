"""Model configuration: one frozen, validated dataclass for Llama 3, Qwen 2.5 and GLM-4.

The three families are the same decoder up to the handful of fields below (see REFERENCE.md section 1).
`family` only decides how a checkpoint is named on disk (checkpoint.py); the model never branches on it.
HuggingFace `config.json` dicts are converted by hf_config.py; reading them from disk is the checkpoint
side's job (`lmforge.checkpoint.config_from_spec`): this module does no file I/O.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from lmforge.errors import LmforgeError, suggest

FAMILIES = ("llama", "qwen2", "glm", "glm4")
ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3", "longrope")
DTYPES = ("float32", "bfloat16", "float16")

# Keys each scaling type needs, beyond rope_type (transformers' modeling_rope_utils validators).
_ROPE_REQUIRED = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings"),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
    "longrope": ("original_max_position_embeddings", "short_factor", "long_factor"),
}


@dataclass(frozen=True)
class RopeScaling:
    """A RoPE scaling variant; formulas in rope.py and REFERENCE.md section 1."""

    rope_type: str
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3
    beta_fast: float | None = None  # yarn
    beta_slow: float | None = None  # yarn
    attention_factor: float | None = None  # yarn, longrope: cos/sin multiplier
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool | None = None  # yarn
    short_factor: tuple[float, ...] | None = None  # longrope
    long_factor: tuple[float, ...] | None = None  # longrope

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise LmforgeError(
                f"unknown rope scaling type {self.rope_type!r}; use one of {', '.join(ROPE_TYPES)}."
                + suggest(self.rope_type, ROPE_TYPES)
            )
        missing = [k for k in _ROPE_REQUIRED[self.rope_type] if getattr(self, k) is None]
        if missing:
            raise LmforgeError(f"rope scaling {self.rope_type!r} needs {', '.join(missing)}; add them to rope_scaling.")
        if self.factor is not None and not self.factor > 0:
            raise LmforgeError(f"rope scaling factor must be > 0, got {self.factor}.")
        for name in ("short_factor", "long_factor"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(float(v) for v in value))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RopeScaling:
        d = dict(d)
        if "type" in d:  # older config.json files name it `type`
            d.setdefault("rope_type", d.pop("type"))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LmforgeError(f"unknown rope scaling keys {unknown}; known keys: {', '.join(sorted(known))}.")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        for name in ("short_factor", "long_factor"):
            if name in out:
                out[name] = list(out[name])
        return out


@dataclass(frozen=True)
class ModelConfig:
    """Everything that determines the decoder's math and its parameter shapes.

    Construct it directly, from a preset (`ModelConfig.from_preset`), from a plain dict
    (`from_dict`, unknown keys rejected) or from a HuggingFace config.json (`from_hf`).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_dim: int = 0  # 0: hidden_size // num_heads (Qwen2 configs have no head_dim field)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    partial_rotary_factor: float = 1.0  # GLM rotates only the first half of each head
    rope_interleaved: bool = False  # GLM: pairs (0,1),(2,3)...; Llama/Qwen: rotate-half
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    post_sublayer_norms: bool = False  # GLM-4-0414: RMSNorm on each sub-layer's output
    tie_embeddings: bool = False
    max_position_embeddings: int = 8192
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None  # also the embedding's padding_idx, as in transformers
    family: str = "llama"  # checkpoint naming only: llama | qwen2 | glm | glm4
    initializer_range: float = 0.02
    dtype: str = "float32"  # dtype of the published weights
    source: str = field(default="", compare=False)  # where the numbers come from (presets)

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling.from_dict(self.rope_scaling))
        if isinstance(self.eos_token_id, int):
            object.__setattr__(self, "eos_token_id", (self.eos_token_id,))
        elif not isinstance(self.eos_token_id, tuple):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise LmforgeError(f"{name} must be a positive integer, got {value!r}.")
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise LmforgeError(
                    f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                    "set head_dim explicitly or change one of them."
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if not isinstance(self.head_dim, int) or self.head_dim < 0:
            raise LmforgeError(f"head_dim must be a positive integer, got {self.head_dim!r}.")
        if self.num_heads % self.num_kv_heads:
            raise LmforgeError(
                f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads} "
                "(each kv head serves num_heads/num_kv_heads query heads); change one of them."
            )
        if not 0 < self.partial_rotary_factor <= 1:
            raise LmforgeError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}.")
        rot = self.rotary_dim
        if rot < 2 or rot % 2:
            raise LmforgeError(
                f"the rotary dimension head_dim*partial_rotary_factor = {self.head_dim}*"
                f"{self.partial_rotary_factor} = {rot} must be even and >= 2; change head_dim or the factor."
            )
        if not (self.norm_eps > 0 and math.isfinite(self.norm_eps)):
            raise LmforgeError(f"norm_eps must be a positive number, got {self.norm_eps}.")
        if not self.rope_theta > 1:
            raise LmforgeError(f"rope_theta must be > 1, got {self.rope_theta}.")
        if self.max_position_embeddings <= 0:
            raise LmforgeError(f"max_position_embeddings must be positive, got {self.max_position_embeddings}.")
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise LmforgeError(f"{name} {value} is outside the vocabulary [0, {self.vocab_size}).")
        for tok in self.eos_token_id:
            if not 0 <= tok < self.vocab_size:
                raise LmforgeError(f"eos_token_id {tok} is outside the vocabulary [0, {self.vocab_size}).")
        s = self.rope_scaling
        if s is not None and s.rope_type == "longrope":
            for name in ("short_factor", "long_factor"):
                if len(getattr(s, name)) != rot // 2:
                    raise LmforgeError(
                        f"rope_scaling.{name} has {len(getattr(s, name))} values; it needs one per rotary frequency, "
                        f"rotary_dim/2 = {rot // 2}."
                    )
        if self.dtype not in DTYPES:
            raise LmforgeError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")
        if self.family not in FAMILIES:
            raise LmforgeError(
                f"family must be one of {', '.join(FAMILIES)}, got {self.family!r}." + suggest(self.family, FAMILIES)
            )
        self._check_family()

    def _check_family(self) -> None:
        """Each checkpoint family can only express some knob combinations; say which knob to change."""
        rules: dict[str, dict[str, Any]] = {
            "llama": {"rope_interleaved": False, "partial_rotary_factor": 1.0, "post_sublayer_norms": False},
            "qwen2": {
                "rope_interleaved": False,
                "partial_rotary_factor": 1.0,
                "post_sublayer_norms": False,
                "qkv_bias": True,
                "o_bias": False,
                "mlp_bias": False,
            },
            "glm": {"rope_interleaved": True, "post_sublayer_norms": False, "o_bias": False, "mlp_bias": False},
            "glm4": {"rope_interleaved": True, "post_sublayer_norms": True, "o_bias": False, "mlp_bias": False},
        }[self.family]
        wrong = {k: v for k, v in rules.items() if getattr(self, k) != v}
        if wrong:
            fix = ", ".join(f"{k}={v}" for k, v in wrong.items())
            raise LmforgeError(f"a {self.family!r} checkpoint requires {fix}; change those fields or the family.")
        if self.family == "llama" and self.o_bias != self.qkv_bias:
            raise LmforgeError("a 'llama' checkpoint has one attention_bias flag: set qkv_bias and o_bias equal.")

    # Derived sizes -------------------------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    # Construction from data ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a plain dict (e.g. a saved lmforge config); unknown keys are rejected."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            hints = "".join(suggest(k, known) for k in unknown)
            raise LmforgeError(f"unknown ModelConfig keys {unknown}.{hints} Known keys: {', '.join(sorted(known))}.")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["rope_scaling"] = self.rope_scaling.to_dict() if self.rope_scaling else None
        out["eos_token_id"] = list(self.eos_token_id)
        return out

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise LmforgeError(f"unknown ModelConfig keys {unknown}." + "".join(suggest(k, known) for k in unknown))
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_preset(cls, name: str) -> ModelConfig:
        """A published checkpoint's config by name (see `list_presets()`)."""
        from lmforge.presets import PRESETS

        if name not in PRESETS:
            raise LmforgeError(
                f"unknown preset {name!r}." + suggest(name, PRESETS) + " `lmforge info --list` shows them all."
            )
        return PRESETS[name]

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        from lmforge.hf_config import config_from_hf

        return config_from_hf(hf)

    def to_hf(self) -> dict[str, Any]:
        from lmforge.hf_config import config_to_hf

        return config_to_hf(self)


def dtype_from_name(name: str) -> torch.dtype:
    """torch dtype for 'float32'/'fp32', 'bfloat16'/'bf16', 'float16'/'fp16'."""
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if name not in names:
        raise LmforgeError(f"unknown dtype {name!r}; use one of float32, bfloat16, float16 (or fp32, bf16, fp16).")
    return names[name]


def list_presets() -> list[str]:
    """Names accepted by `ModelConfig.from_preset`."""
    from lmforge.presets import PRESETS

    return list(PRESETS)
