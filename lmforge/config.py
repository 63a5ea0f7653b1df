"""Model configuration: one frozen, validated dataclass for Llama 3, Qwen 2.5 and GLM-4.

The three families are the same decoder up to the handful of fields below (see REFERENCE.md section 1).
`family` only decides how a checkpoint is named on disk (lmforge/checkpoint/); the model never branches on it.
HuggingFace `config.json` dicts are converted by hf_config.py; reading them from disk is the checkpoint
side's job (`lmforge.checkpoint.config_from_spec`): this module does no file I/O.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
from dataclasses import dataclass, field
from typing import Any

import torch

from lmforge.errors import LmforgeError, suggest, warn

FAMILIES = ("llama", "qwen2", "glm", "glm4")
ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3", "longrope")
DTYPES = ("float32", "bfloat16", "float16")

# The largest tensor a config may describe, in elements: ~500x the largest matrix of any published model
# (Llama 3.1 405B's embedding, 2.1e9), far below where torch's int64 byte counts overflow on the meta device.
MAX_TENSOR_ELEMENTS = 2**40


# --- Type checks shared with hf_config.py (which passes config.json's key names). --------------------------
_SHORT = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 40, 40, 40, 6, 4, 2


def shown(value: Any) -> str:
    """repr(value) cut to a readable length, for error messages about values read from files."""
    return _SHORT.repr(value)


# Integer fields take Python ints only: not bools, and not floats, not even integral ones such as 100.0:
# transformers 5 reads config.json through strict dataclasses that refuse a float for an int field too, so
# a config.json with `"max_position_embeddings": 100.0` is not one transformers loads (the error suggests
# writing 100). Float fields take ints as well and store them as floats (1 is the number 1.0; transformers
# refuses an int there, so a config.json lmforge writes always holds a float).
def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_int(name: str, value: Any, *, minimum: int = 1, hint: str = "") -> int:
    """`value` when it is an int >= minimum, else an LmforgeError naming `name` (and `hint`, the remedy)."""
    if is_int(value) and value >= minimum:
        return value
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    if is_number(value) and minimum <= value < 2**53 and float(value).is_integer():
        hint = f"write it as {int(value)}"
    raise LmforgeError(f"{name} must be {what}, got {shown(value)}" + (f"; {hint}." if hint else "."))


def check_number(name: str, value: Any, *, above: float | None = None, at_least: float | None = None) -> float:
    """`value` as a float when it is a finite int/float (> above, >= at_least), else an LmforgeError naming it."""
    ok = is_number(value) and math.isfinite(value)
    ok = ok and (above is None or value > above) and (at_least is None or value >= at_least)
    if not ok:
        bound = f" > {above:g}" if above is not None else f" >= {at_least:g}" if at_least is not None else ""
        raise LmforgeError(f"{name} must be a finite number{bound}, got {shown(value)}.")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise LmforgeError(f"{name} must be true or false, got {shown(value)}.")
    return value


def check_token_id(name: str, value: Any) -> int | None:
    """None or an int. An id outside the vocabulary is legal (see ModelConfig); a bool or float is not."""
    if value is not None and not is_int(value):
        raise LmforgeError(f"{name} must be an integer token id or null, got {shown(value)}.")
    return value


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
        if not isinstance(self.rope_type, str) or self.rope_type not in ROPE_TYPES:
            raise LmforgeError(
                f"unknown rope scaling type {shown(self.rope_type)}; use one of {', '.join(ROPE_TYPES)}."
                + (suggest(self.rope_type, ROPE_TYPES) if isinstance(self.rope_type, str) else "")
            )
        missing = [k for k in _ROPE_REQUIRED[self.rope_type] if getattr(self, k) is None]
        if missing:
            raise LmforgeError(f"rope scaling {self.rope_type!r} needs {', '.join(missing)}; add them to rope_scaling.")
        if self.factor is not None and not (is_number(self.factor) and self.factor > 0):
            raise LmforgeError(f"rope scaling factor must be > 0, got {shown(self.factor)}.")
        # Each value enters a formula in rope.py; the bounds are where those formulas stay defined
        # (a log, a division, a ratio of mscales).
        positive = ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "attention_factor")
        for name in (*positive, "mscale", "mscale_all_dim"):
            value = getattr(self, name)
            if value is not None:
                if name in positive:
                    check_number(f"rope scaling {name}", value, above=0)
                else:
                    check_number(f"rope scaling {name}", value, at_least=0)
        if self.original_max_position_embeddings is not None:
            check_int("rope scaling original_max_position_embeddings", self.original_max_position_embeddings)
        if self.truncate is not None:
            check_bool("rope scaling truncate", self.truncate)
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise LmforgeError(
                f"rope scaling high_freq_factor ({self.high_freq_factor}) must be greater than low_freq_factor "
                f"({self.low_freq_factor}); Llama 3 checkpoints use 4 and 1."
            )
        for name in ("short_factor", "long_factor"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str | bytes | dict) or not hasattr(value, "__iter__"):
                raise LmforgeError(f"rope scaling {name} must be a list of numbers, got {shown(value)}.")
            values = tuple(value)
            for v in values:
                check_number(f"each value of rope scaling {name}", v, above=0)
            object.__setattr__(self, name, tuple(float(v) for v in values))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RopeScaling:
        if not isinstance(d, dict):
            raise LmforgeError(
                f"rope scaling must be a JSON object such as {{'rope_type': 'linear', ...}}, got {shown(d)}."
            )
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
        elif self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise LmforgeError(f"rope_scaling must be None, a dict or a RopeScaling, got {shown(self.rope_scaling)}.")
        eos = self.eos_token_id
        if is_int(eos):
            eos = (eos,)
        elif isinstance(eos, list | tuple):
            eos = tuple(eos)
        else:
            raise LmforgeError(f"eos_token_id must be an integer or a list of integers, got {shown(eos)}.")
        for tok in eos:
            if not is_int(tok):
                raise LmforgeError(
                    f"eos_token_id must be an integer or a list of integers, got {shown(self.eos_token_id)}."
                )
        object.__setattr__(self, "eos_token_id", eos)
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            check_int(name, getattr(self, name))
        check_int("head_dim", self.head_dim, minimum=0, hint="0 means hidden_size // num_heads")
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise LmforgeError(
                    f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                    "set head_dim explicitly or change one of them."
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise LmforgeError(
                f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads} "
                "(each kv head serves num_heads/num_kv_heads query heads); change one of them."
            )
        shapes = {
            "embedding [vocab_size, hidden_size]": self.vocab_size * self.hidden_size,
            "MLP [intermediate_size, hidden_size]": self.intermediate_size * self.hidden_size,
            "attention [num_heads * head_dim, hidden_size]": self.num_heads * self.head_dim * self.hidden_size,
        }
        name, size = max(shapes.items(), key=lambda kv: kv[1])
        if size > MAX_TENSOR_ELEMENTS:
            raise LmforgeError(
                f"the {name} matrix would have {size:,} elements, more than any model has (limit 2**40); "
                "check those sizes."
            )
        if not (is_number(self.partial_rotary_factor) and 0 < self.partial_rotary_factor <= 1):
            raise LmforgeError(f"partial_rotary_factor must be in (0, 1], got {shown(self.partial_rotary_factor)}.")
        rot = self.rotary_dim
        if rot < 2 or rot % 2:
            raise LmforgeError(
                f"the rotary dimension head_dim*partial_rotary_factor = {self.head_dim}*"
                f"{self.partial_rotary_factor} = {rot} must be even and >= 2; change head_dim or the factor."
            )
        object.__setattr__(self, "norm_eps", check_number("norm_eps", self.norm_eps, above=0))
        object.__setattr__(self, "rope_theta", check_number("rope_theta", self.rope_theta, above=1))
        range_ = check_number("initializer_range", self.initializer_range, at_least=0)
        object.__setattr__(self, "initializer_range", range_)
        object.__setattr__(self, "partial_rotary_factor", float(self.partial_rotary_factor))
        check_int("max_position_embeddings", self.max_position_embeddings)
        for name in ("rope_interleaved", "qkv_bias", "o_bias", "mlp_bias", "post_sublayer_norms", "tie_embeddings"):
            check_bool(name, getattr(self, name))
        for name in ("bos_token_id", "pad_token_id"):
            check_token_id(name, getattr(self, name))
        # Special-token ids outside the vocabulary are legal in HF configs (transformers warns and keeps them:
        # GlmConfig's default eos ids 151329.. come with any vocab_size, and tiny GLM checkpoints carry them).
        # They are kept, so that a re-saved config.json says the same, and ignored where an id must be a row
        # of the embedding: see padding_idx and usable_eos_token_ids.
        ids = {
            "bos_token_id": (self.bos_token_id,),
            "eos_token_id": self.eos_token_id,
            "pad_token_id": (self.pad_token_id,),
        }
        outside = {
            name: ", ".join(str(t) for t in toks if t is not None and not 0 <= t < self.vocab_size)
            for name, toks in ids.items()
        }
        if any(outside.values()):
            warn(
                f"special token ids outside the vocabulary [0, {self.vocab_size}) are kept in the config (as "
                f"transformers does) but never used: {'; '.join(f'{k} {v}' for k, v in outside.items() if v)}."
            )
        s = self.rope_scaling
        if s is not None and s.rope_type == "longrope":
            for name in ("short_factor", "long_factor"):
                if len(getattr(s, name)) != rot // 2:
                    raise LmforgeError(
                        f"rope_scaling.{name} has {len(getattr(s, name))} values; it needs one per rotary frequency, "
                        f"rotary_dim/2 = {rot // 2}."
                    )
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise LmforgeError(f"dtype must be one of {', '.join(DTYPES)}, got {shown(self.dtype)}.")
        if not isinstance(self.family, str) or self.family not in FAMILIES:
            raise LmforgeError(
                f"family must be one of {', '.join(FAMILIES)}, got {shown(self.family)}."
                + (suggest(self.family, FAMILIES) if isinstance(self.family, str) else "")
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

    @property
    def padding_idx(self) -> int | None:
        """pad_token_id when it is a row of the embedding, else None (an id outside the vocabulary is ignored)."""
        pad = self.pad_token_id
        return pad if pad is not None and 0 <= pad < self.vocab_size else None

    @property
    def usable_eos_token_ids(self) -> tuple[int, ...]:
        """The eos ids a model can produce: eos_token_id without the ids outside the vocabulary."""
        return tuple(tok for tok in self.eos_token_id if 0 <= tok < self.vocab_size)

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
