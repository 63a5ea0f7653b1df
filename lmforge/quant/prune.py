"""Pruning, applied to a model from outside: zero single weights (magnitude, 2:4) or remove whole attention
heads and FFN channels (structured.py), scored by weight magnitude or by activations (importance.py).

Methods (`prune(model, method, sparsity)`):
- magnitude: in every attention and MLP projection (q, k, v, o, gate, up, down of each layer; never the
  embedding, the norms or the output head, which SparseGPT and Wanda leave dense too) the `sparsity` share of
  weights with the smallest score is set to zero, counted per matrix (per output row with activation
  scores, as Wanda compares them), so every projection ends at the same sparsity. The model keeps its
  shapes: the zeros save memory only in a sparse format or after compression.
- 2:4: in every group of 4 consecutive input weights of a row the 2 with the smallest score are zeroed:
  the semi-structured pattern sparse tensor cores run at up to 2x (Mishra et al. 2021, arXiv 2104.08378).
- heads: whole KV groups (one kv head with the G query heads that read it) are removed, the same number in
  every layer, so num_key_value_heads and num_attention_heads shrink together (structured.py).
- channels: FFN channels (a row of gate and up, a column of down) are removed, the same number in every
  layer: intermediate_size shrinks (structured.py).

Scores (`importance`):
- magnitude: |w|; for a KV group ||V_g|| * ||O_g||, for a channel ||gate_c|| * ||up_c|| * ||down_c||.
- activation: measured on a few calibration batches (importance.py): Wanda's |w_ij| * ||x_j||, compared
  within each output row (Sun et al. 2023, arXiv 2306.11695); for a KV group the mean norm of what it writes
  to the residual stream, for a channel E|h_c| * ||down_c||.

The unstructured methods return keep-masks, so that a recovery fine-tune can hold the zeros (recover.py).
Shape letters: O output features, I input features.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.options import option, validate
from lmforge.runtime import DTYPE_CHOICES, DTYPE_HELP

METHODS = ("magnitude", "2:4", "heads", "channels")
IMPORTANCE = ("magnitude", "activation")
# The projections of each decoder layer that pruning touches (module paths inside a Block).
PROJECTIONS = (
    "attn.q_proj",
    "attn.k_proj",
    "attn.v_proj",
    "attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@dataclass(frozen=True)
class PruneConfig:
    """The options of `lmforge prune`: what to remove, how to score it, the recovery fine-tune, the evaluation."""

    method: str = option(
        "magnitude", "magnitude, 2:4 (zero weights), heads or channels (remove them; docs/pruning.md)", choices=METHODS
    )
    sparsity: float = option(
        0.5,
        "share removed, in (0, 1): of the projection weights (magnitude), of the KV groups (heads) or of the FFN "
        "channels (channels) of every layer; 2:4 is always 0.5",
    )
    importance: str = option(
        "magnitude",
        "score by weight magnitude, or by activations on --calib-batches batches of --data (Wanda-style)",
        choices=IMPORTANCE,
    )
    calib_batches: int = option(8, "with --importance activation: batches of --data to measure activations on")
    recover_steps: int = option(0, "fine-tune this many steps on --data after pruning, the zeros held (0: none)")
    recover_lr: float = option(1e-4, "peak learning rate of the recovery fine-tune")
    recover_batch_size: int = option(8, "sequences per batch (recovery and calibration)")
    recover_seq_len: int = option(256, "tokens per sequence (recovery and calibration)")
    recover_dtype: str = option("auto", "recovery compute precision: " + DTYPE_HELP, choices=DTYPE_CHOICES)
    eval_tokens: int = option(0, "score at most this many tokens of prepared --eval-data shards (0: all)")
    eval_length: int = option(0, "tokens of context per perplexity window (0: the model's context, at most 1024)")
    seed: int = option(0, "seed of the recovery fine-tune's data order")

    def __post_init__(self) -> None:
        validate(self)
        check_sparsity(self.method, self.sparsity)
        for name in ("calib_batches", "recover_batch_size", "recover_seq_len"):
            if getattr(self, name) <= 0:
                raise LmforgeError(f"{name} must be positive, got {getattr(self, name)}.")
        for name in ("recover_steps", "eval_tokens", "eval_length"):
            if getattr(self, name) < 0:
                raise LmforgeError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if not self.recover_lr > 0:
            raise LmforgeError(f"recover_lr must be positive, got {self.recover_lr}.")


def check_sparsity(method: str, sparsity: float) -> None:
    if method not in METHODS:
        raise LmforgeError(f"unknown pruning method {method!r}; use one of {', '.join(METHODS)}.")
    if not 0 < sparsity < 1:
        raise LmforgeError(f"--sparsity must be in (0, 1) (the share removed), got {sparsity}.")
    if method == "2:4" and sparsity != 0.5:
        raise LmforgeError(f"2:4 pruning always removes half the weights; drop --sparsity {sparsity} or give 0.5.")


def rounded(x: float) -> int:
    """Round half up (Python's round() rounds half to even, which would make 0.5 * 1 remove nothing)."""
    return math.floor(x + 0.5)


@dataclass
class PruneResult:
    """`model` is the input model, changed in place (magnitude, 2:4), or a new, smaller one (heads, channels)
    that shares the untouched tensors with the input model. `masks`: projection name -> boolean keep-mask of
    its weight [O, I] (unstructured methods only). `removed`: KV groups or channels removed per layer."""

    model: Transformer
    method: str
    sparsity: float
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    removed: int = 0
    importance: str = "magnitude"

    def describe(self) -> str:
        c = self.model.config
        if self.method == "heads":
            g = c.num_kv_groups
            return (
                f"removed {self.removed} of {c.num_kv_heads + self.removed} KV groups per layer "
                f"({self.removed * g} of {c.num_heads + self.removed * g} attention heads)"
            )
        if self.method == "channels":
            return (
                f"removed {self.removed} of {c.intermediate_size + self.removed} FFN channels per layer "
                f"(intermediate_size {c.intermediate_size})"
            )
        kept = sum(int(m.sum()) for m in self.masks.values())
        total = sum(m.numel() for m in self.masks.values())
        per = "per output row" if self.importance == "activation" else "per matrix"
        pattern = "in every group of 4 inputs, 2 kept" if self.method == "2:4" else per
        return f"zeroed {total - kept:,} of {total:,} projection weights ({1 - kept / total:.1%}, {pattern})"


def projections(model: Transformer) -> dict[str, nn.Linear]:
    """The Linear layers pruning touches, by module name (layers.{i}.attn.q_proj, ...)."""
    return {f"layers.{i}.{p}": block.get_submodule(p) for i, block in enumerate(model.layers) for p in PROJECTIONS}


@dataclass(frozen=True)
class SizeStats:
    """Parameter counts (a tied embedding counted once) and how many of them are non-zero."""

    params: int
    nonzero: int
    projection: int  # weights of the attention and MLP projections
    projection_nonzero: int

    @property
    def projection_sparsity(self) -> float:
        return 1 - self.projection_nonzero / self.projection if self.projection else 0.0


@torch.no_grad()
def size_stats(model: Transformer) -> SizeStats:
    params = list(model.parameters())  # unique: a tied head is the embedding
    weights = [m.weight for m in projections(model).values()]
    return SizeStats(
        params=sum(p.numel() for p in params),
        nonzero=sum(int(torch.count_nonzero(p)) for p in params),
        projection=sum(w.numel() for w in weights),
        projection_nonzero=sum(int(torch.count_nonzero(w)) for w in weights),
    )


def smallest_mask(score: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Keep-mask [O, I] that drops the round(sparsity * n) smallest scores of the matrix (or of each row)."""
    if per_row:
        k = rounded(sparsity * score.shape[1])
        drop = torch.topk(score, k, dim=1, largest=False).indices  # [O, k]
        return torch.ones_like(score, dtype=torch.bool).scatter_(1, drop, False)
    k = rounded(sparsity * score.numel())
    drop = torch.topk(score.flatten(), k, largest=False).indices
    return torch.ones(score.numel(), dtype=torch.bool, device=score.device).scatter_(0, drop, False).view_as(score)


def two_four_mask(score: torch.Tensor) -> torch.Tensor:
    """Keep-mask [O, I] that keeps the 2 largest scores of every 4 consecutive inputs of each row."""
    O, I = score.shape
    groups = score.reshape(O, I // 4, 4)  # [O, I/4, 4]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(2, dim=2).indices, True)
    return keep.reshape(O, I)


def _check_two_four(model: Transformer) -> None:
    for name, linear in projections(model).items():
        if linear.in_features % 4:
            raise LmforgeError(
                f"2:4 pruning groups 4 consecutive inputs, but {name} has {linear.in_features} inputs (not a multiple "
                "of 4); use --method magnitude."
            )


def prune(
    model: Transformer,
    method: str = "magnitude",
    sparsity: float = 0.5,
    *,
    importance: str = "magnitude",
    calibration: Iterable[dict[str, torch.Tensor]] | None = None,
    calib_batches: int = 8,
) -> PruneResult:
    """Prune `model` (see the module docstring). `calibration`: batches with input_ids [B, T] (and optionally
    position_ids), the first `calib_batches` of which are run for `importance="activation"`."""
    check_sparsity(method, sparsity)
    if importance not in IMPORTANCE:
        raise LmforgeError(f"unknown importance {importance!r}; use one of {', '.join(IMPORTANCE)}.")
    if method == "2:4":
        _check_two_four(model)
    if method in ("heads", "channels"):
        from lmforge.quant.structured import removal_count

        removal_count(model.config, method, sparsity)  # refuse before any calibration work
    acts = None
    if importance == "activation":
        if calibration is None:
            raise LmforgeError("--importance activation measures activations on --data: give prepared shards.")
        from lmforge.quant.importance import calibrate

        acts = calibrate(model, calibration, calib_batches)
    if method == "heads":
        from lmforge.quant.structured import remove_heads

        model, removed = remove_heads(model, sparsity, acts)
        return PruneResult(model, method, sparsity, removed=removed, importance=importance)
    if method == "channels":
        from lmforge.quant.structured import remove_channels

        model, removed = remove_channels(model, sparsity, acts)
        return PruneResult(model, method, sparsity, removed=removed, importance=importance)
    masks: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, linear in projections(model).items():
            w = linear.weight
            score = w.detach().abs().float()
            if acts is not None:
                score = score * acts.input_norm(name)[None, :]  # Wanda: |w_ij| * ||x_j||
            if method == "2:4":
                keep = two_four_mask(score)
            else:
                keep = smallest_mask(score, sparsity, per_row=acts is not None)
            w.masked_fill_(~keep, 0)
            masks[name] = keep
    return PruneResult(model, method, sparsity, masks, importance=importance)
