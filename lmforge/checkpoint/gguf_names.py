"""llama.cpp's GGUF tensor names for lmforge's tensors, per architecture, in both directions.

The name strings are not written here: they come from the gguf package's copy of llama.cpp's tables
(`gguf.constants.TENSOR_NAMES`, `MODEL_TENSORS[MODEL_ARCH.X]`); this module only says which lmforge tensor
each llama.cpp tensor holds. Also here: the one layout change llama.cpp makes to the weights themselves,
the row permutation of Llama's Q and K projections.

Shape letters: H heads (query heads for Q, kv heads for K), D head_dim, C input columns.
"""

from __future__ import annotations

from types import ModuleType

import torch

from lmforge.checkpoint.hf import layer_template
from lmforge.errors import LmforgeError

# lmforge family -> llama.cpp architecture (`general.architecture`); the same words for these three.
GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "glm4": "glm4"}


def import_gguf() -> ModuleType:
    """The gguf package, or an LmforgeError naming the extra that installs it."""
    try:
        import gguf
    except ImportError:
        raise LmforgeError(
            "reading and writing GGUF files needs the gguf package: pip install 'lmforge[gguf]'."
        ) from None
    return gguf


# lmforge name template ({i} = layer) -> (gguf.MODEL_TENSOR member, suffix).
_PROJ = {"q": "ATTN_Q", "k": "ATTN_K", "v": "ATTN_V", "o": "ATTN_OUT"}
_MLP = {"gate": "FFN_GATE", "up": "FFN_UP", "down": "FFN_DOWN"}
_COMMON: dict[str, tuple[str, str]] = {
    "embed.weight": ("TOKEN_EMBD", "weight"),
    "norm.weight": ("OUTPUT_NORM", "weight"),
    "lm_head.weight": ("OUTPUT", "weight"),
    "layers.{i}.attn_norm.weight": ("ATTN_NORM", "weight"),
    "layers.{i}.mlp_norm.weight": ("FFN_NORM", "weight"),
    **{f"layers.{{i}}.attn.{p}_proj.{w}": (t, w) for p, t in _PROJ.items() for w in ("weight", "bias")},
}
_SPLIT_MLP = {f"layers.{{i}}.mlp.{p}_proj.{w}": (t, w) for p, t in _MLP.items() for w in ("weight", "bias")}
TENSOR_MAPS: dict[str, dict[str, tuple[str, str]]] = {
    "llama": {**_COMMON, **_SPLIT_MLP},
    "qwen2": {**_COMMON, **_SPLIT_MLP},
    "glm4": {
        **_COMMON,
        "layers.{i}.mlp.down_proj.weight": ("FFN_DOWN", "weight"),
        "layers.{i}.attn_out_norm.weight": ("ATTN_POST_NORM", "weight"),
        "layers.{i}.mlp_out_norm.weight": ("FFN_POST_NORM", "weight"),
    },
}
# llama.cpp's GLM-4 graph has no ffn_gate: ffn_up holds [gate; up] ([2I, h], gate rows first) and its
# SwiGLU applies silu to the first half, as transformers' gate_up_proj.
FUSED: dict[str, dict[tuple[str, str], tuple[str, ...]]] = {
    "glm4": {("FFN_UP", "weight"): ("layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.up_proj.weight")},
}
# llama.cpp's rope_freqs tensor (one factor per rotary frequency, dividing it) has no lmforge tensor: it
# is derived from the config's rope scaling (gguf_config.py).
ROPE_FREQS = ("ROPE_FREQS", "weight")


def gguf_name(family: str, member: str, suffix: str, layer: str | int | None = None) -> str:
    """llama.cpp's name for tensor `member` (a gguf.MODEL_TENSOR name) of layer `layer`, e.g. blk.0.attn_q.weight."""
    gguf = import_gguf()
    arch = gguf.MODEL_ARCH[GGUF_ARCHS[family].upper()]
    tensor = gguf.MODEL_TENSOR[member]
    assert tensor in gguf.MODEL_TENSORS[arch], (family, member)  # the tables above are llama.cpp's
    base = gguf.TENSOR_NAMES[tensor]
    return (base.format(bid=layer) if layer is not None else base) + "." + suffix


def to_gguf_names(names: list[str], family: str) -> dict[str, tuple[str, ...]]:
    """GGUF tensor name -> the lmforge names it holds (one, or gate and up for GLM-4's fused ffn_up)."""
    if family not in GGUF_ARCHS:
        raise LmforgeError(
            f"GGUF export supports the families {', '.join(GGUF_ARCHS)}; this model is {family!r}."
            + (" (GLM-4-9B's llama.cpp arch is chatglm, not supported.)" if family == "glm" else "")
        )
    key_map, fused = TENSOR_MAPS[family], FUSED.get(family, {})
    fused_by_part = {part: key for key, parts in fused.items() for part in parts}
    out: dict[str, tuple[str, ...]] = {}
    for name in names:
        tmpl, layer = layer_template(name)
        if tmpl in fused_by_part:
            key = fused_by_part[tmpl]
            out[gguf_name(family, *key, layer)] = tuple(p.format(i=layer) for p in fused[key])
        elif tmpl in key_map:
            out[gguf_name(family, *key_map[tmpl], layer)] = (name,)
        else:
            raise LmforgeError(f"lmforge tensor {name} has no GGUF name for the {family} architecture.")
    return out


# --- Llama's Q/K rows --------------------------------------------------------------------------------
# transformers' Llama rotates the two halves of each head against each other; llama.cpp's llama graph
# rotates adjacent pairs. llama.cpp's converter reorders the rows of Q and K (weights and biases) so that
# pair j of a head holds rows (j, j + D/2): the same attention, in llama.cpp's layout. Qwen2 (NeoX rope in
# llama.cpp) and GLM-4 (already pairwise) are stored as they are.
PERMUTED_ROWS = {"attn.q_proj": "num_heads", "attn.k_proj": "num_kv_heads"}  # module -> config field of H


def permuted_heads(name: str, family: str, num_heads: int, num_kv_heads: int) -> int | None:
    """H for a tensor whose rows llama.cpp permutes (Llama's q/k weights and biases), else None."""
    if family != "llama":
        return None
    for module, field in PERMUTED_ROWS.items():
        if f".{module}." in name:
            return num_heads if field == "num_heads" else num_kv_heads
    return None


def to_llamacpp_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF rotate-half rows -> llama.cpp pairwise rows, per head: [H*D, C] (or [H*D])."""
    rest = w.shape[1:]
    # [H*D, C] -> [H, 2, D/2, C] (halves) -> [H, D/2, 2, C] (pairs) -> [H*D, C]
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *rest).transpose(1, 2).reshape(w.shape)


def from_llamacpp_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `to_llamacpp_rows`."""
    rest = w.shape[1:]
    # [H*D, C] -> [H, D/2, 2, C] (pairs) -> [H, 2, D/2, C] (halves) -> [H*D, C]
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *rest).transpose(1, 2).reshape(w.shape)
