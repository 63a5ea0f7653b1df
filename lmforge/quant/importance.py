"""Activation statistics for pruning scores, measured on a few calibration batches with forward hooks.

Per projection, the sum over tokens of each input feature squared (Wanda's ||x_j||^2, Sun et al. 2023);
per layer, the sum of |h_c| at down_proj's input (so E|h_c| * ||down_c|| is the mean norm of what FFN
channel c writes), and the sum over tokens of ||O_g y_g||, the norm of what KV group g (its G query heads'
attention output y_g through their o_proj columns O_g) writes to the residual stream.

Shape letters: N tokens, h hidden, K kv heads, G query heads per kv head, D head_dim.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.runtime import model_device

_CHUNK = 512  # tokens per step of the per-group output norms (bounds the [N, K, h] temporary)


@dataclass
class Activations:
    tokens: int = 0
    input_sq: dict[str, torch.Tensor] = field(default_factory=dict)  # projection -> [I] sum of x_j^2
    channel_abs: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [I_ffn] sum of |h_c|
    group_out: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [K] sum of ||O_g y_g||

    def input_norm(self, name: str) -> torch.Tensor:
        """||x_j|| over the calibration tokens, per input feature of projection `name`."""
        return self.input_sq[name].sqrt()


def _group_norms(y: torch.Tensor, o_weight: torch.Tensor, K: int) -> torch.Tensor:
    """Sum over tokens of ||O_g y_g|| per KV group; y [N, H*D], o_weight [h, H*D] -> [K]."""
    N = y.shape[0]
    o = o_weight.float().reshape(o_weight.shape[0], K, -1)  # [h, K, G*D]
    total = torch.zeros(K, device=y.device)
    for start in range(0, N, _CHUNK):
        part = y[start : start + _CHUNK].reshape(-1, K, o.shape[2])  # [n, K, G*D]
        out = torch.einsum("nkd,hkd->nkh", part, o)  # [n, K, h]
        total += out.norm(dim=2).sum(0)
    return total


@torch.no_grad()
def calibrate(model: Transformer, batches: Iterable[dict[str, torch.Tensor]], max_batches: int) -> Activations:
    """Run up to `max_batches` batches through `model` and collect the statistics above."""
    from lmforge.quant.prune import projections

    acts = Activations()
    K = model.config.num_kv_heads
    hooks = []

    def watch(name: str, layer: int, module: nn.Linear):
        def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].reshape(-1, module.in_features).float()  # [N, I]
            acts.input_sq[name] = acts.input_sq.get(name, 0) + x.pow(2).sum(0)
            if name.endswith("down_proj"):
                acts.channel_abs[layer] = acts.channel_abs.get(layer, 0) + x.abs().sum(0)
            elif name.endswith("o_proj"):
                acts.group_out[layer] = acts.group_out.get(layer, 0) + _group_norms(x, module.weight, K)

        return hook

    for name, linear in projections(model).items():
        layer = int(name.split(".")[1])
        hooks.append(linear.register_forward_hook(watch(name, layer, linear)))
    was_training = model.training
    model.eval()
    device = model_device(model)
    try:
        for i, batch in enumerate(batches):
            if i >= max_batches:
                break
            ids = batch["input_ids"].to(device)
            positions = batch.get("position_ids")
            model(ids, position_ids=positions.to(device) if positions is not None else None)
            acts.tokens += ids.numel()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if acts.tokens == 0:
        raise LmforgeError("the calibration data gave no batches; give --data with more tokens.")
    return acts
