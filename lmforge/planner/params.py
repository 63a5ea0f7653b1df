"""The model's parameter tensors and how each is split over devices: weights, gradients, optimizer state.

lmforge trains fp32 parameters and autocasts the compute (lmforge.runtime.autocast), so weights and
gradients are 4 bytes per element whatever --dtype says. Tensor parallelism follows the Megatron layout
that torchtitan applies with DTensor: q/k/v and gate/up are column-parallel (their weight's dim 0 and
their bias are split), o and down are row-parallel (dim 1 split, bias replicated), the embedding and the
output head are split over the vocabulary, norms are replicated (lmforge.parallel.tp). FSDP (FSDP2's
fully_shard, lmforge.parallel.fsdp) then splits dim 0 of each (TP-local) tensor over the data-parallel
ranks, padding it to a multiple of the degree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmforge.config import ModelConfig
from lmforge.model import Block

FP32 = 4
ADAMW_STEP_BYTES = 4  # torch.optim.AdamW(fused=True) keeps `step` as a float32 scalar tensor per parameter

_COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # split on the output features (dim 0)
_ROW = ("o_proj", "down_proj")  # split on the input features (dim 1); their bias is replicated


@dataclass(frozen=True)
class Param:
    """One parameter tensor: its shape, the dim TP splits (None: replicated), and the FSDP unit it belongs to."""

    name: str
    shape: tuple[int, ...]
    tp_dim: int | None
    unit: str  # "block", or "embed" / "head": the FSDP root (lmforge.parallel.fsdp)
    hidden: bool  # a hidden matrix: Muon trains it (momentum only), AdamW trains the rest

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def local_shape(self, tp: int, dp: int) -> tuple[int, ...]:
        """The shard one device holds: the TP split (rounded up), then FSDP's dim-0 split of it (dp=1: none)."""
        shape = list(self.shape)
        if self.tp_dim is not None:
            shape[self.tp_dim] = math.ceil(shape[self.tp_dim] / tp)
        shape[0] = math.ceil(shape[0] / dp)
        return tuple(shape)

    def local_numel(self, tp: int, dp: int) -> int:
        return math.prod(self.local_shape(tp, dp))


def _tp_dim(name: str) -> int | None:
    module, kind = name.split(".")[-2:]
    if module in _COLUMN:
        return 0
    if module in _ROW:
        return 1 if kind == "weight" else None
    return None  # norms


def block_params(config: ModelConfig) -> list[Param]:
    """The parameters of one decoder block (every block has the same), read from a meta-device Block."""
    with torch.device("meta"):
        block = Block(config)
    return [Param(name, tuple(p.shape), _tp_dim(name), "block", p.dim() == 2) for name, p in block.named_parameters()]


def model_params(config: ModelConfig) -> list[Param]:
    """Every parameter tensor of the model: the blocks' (repeated), the embedding, final norm and output head."""
    c = config
    out = [
        Param(f"layers.{i}.{p.name}", p.shape, p.tp_dim, p.unit, p.hidden)
        for i in range(c.num_layers)
        for p in block_params(c)
    ]
    out.append(Param("embed.weight", (c.vocab_size, c.hidden_size), 0, "embed", False))
    out.append(Param("norm.weight", (c.hidden_size,), None, "head", False))
    if not c.tie_embeddings:
        out.append(Param("lm_head.weight", (c.vocab_size, c.hidden_size), 0, "head", False))
    return out


def weight_bytes(params: list[Param], tp: int = 1, dp: int = 1) -> int:
    """fp32 weights (and, the same, fp32 gradients) one device holds."""
    return sum(FP32 * p.local_numel(tp, dp) for p in params)


def optimizer_bytes(params: list[Param], optimizer: str, tp: int = 1, dp: int = 1) -> int:
    """Optimizer state one device holds. AdamW: two fp32 moments per element and a 4-byte step per tensor.
    Muon (lmforge.train.muon): one fp32 momentum for each hidden matrix, two moments (and a Python-int step)
    for the rest."""
    total = 0
    for p in params:
        n = p.local_numel(tp, dp)
        if optimizer == "muon":
            total += FP32 * n * (1 if p.hidden else 2)
        else:
            total += FP32 * 2 * n + ADAMW_STEP_BYTES
    return total


def fsdp_gathered_bytes(params: list[Param], config: ModelConfig, tp: int, param_bytes: int) -> int:
    """Bytes FSDP holds all-gathered (split only by TP) while the blocks run, as lmforge.parallel.fsdp wraps
    the model: one unit per block and the root (embedding, final norm, output head), which FSDP2 does not
    reshard after the forward, so it stays gathered for the whole step; plus the running block and the next
    one, prefetched. `param_bytes`: 2 when FSDP gathers bf16 parameters (MixedPrecisionPolicy), else 4."""
    block = sum(p.local_numel(tp, 1) for p in block_params(config))
    root = sum(p.local_numel(tp, 1) for p in params if p.unit != "block")
    return param_bytes * (root + min(2, config.num_layers) * block)
