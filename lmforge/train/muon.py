"""Muon for the hidden weight matrices, AdamW for everything else, as one optimizer with one state_dict.

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers in neural networks"; used by
modded-nanogpt and nanochat) keeps SGD momentum per matrix and replaces each update by the nearest
semi-orthogonal matrix, computed with a few Newton-Schulz iterations instead of an SVD: every direction of
the update then moves the weights by the same amount, however small its gradient was. Embeddings, the
output head, norms and biases are not hidden matrices and keep AdamW (the speedrun recipe).

The orthogonalised update is scaled by 0.2 * sqrt(max(rows, cols)), which gives it the RMS of a typical
AdamW update (Liu et al. 2025, "Muon is scalable for LLM training"), so both kinds of parameters can share
one learning rate and one schedule; `lr_scale` in a group multiplies it where they should not.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lmforge.errors import LmforgeError

# The quintic's coefficients (Jordan 2024): chosen to push every singular value in (0, 1] quickly into
# about [0.7, 1.2] rather than to converge to exactly 1, which takes many more iterations.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
RMS_MATCH = 0.2  # update RMS of AdamW that Muon's update is scaled to (Liu et al. 2025)


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """An approximation of U V^T for g = U S V^T (..., r, c), by Newton-Schulz iterations.

    Works on the wide orientation (r <= c) so that the Gram matrix X X^T is the small one; leading
    dimensions are a batch of matrices orthogonalised independently."""
    a, b, c = NS_COEFFICIENTS
    tall = g.shape[-2] > g.shape[-1]
    x = g.mT if tall else g
    # Frobenius normalisation puts every singular value in [0, 1], where the iteration converges.
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.mT if tall else x


def update_scale(shape: torch.Size) -> float:
    """The factor that gives an orthogonalised update of this [rows, cols] shape AdamW's update RMS."""
    return RMS_MATCH * math.sqrt(max(shape[-2], shape[-1]))


def hidden_matrices(model: nn.Module) -> set[int]:
    """ids of the 2-D weights Muon should train: every matrix but embeddings and the output head."""
    excluded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    output = getattr(model, "output_weight", None)
    if isinstance(output, torch.Tensor):
        excluded.add(id(output))
    return {id(p) for p in model.parameters() if p.requires_grad and p.dim() == 2 and id(p) not in excluded}


def muon_param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict]:
    """Muon for the hidden matrices (with weight decay); AdamW for the rest: embeddings and head (decayed
    only with `decay_embeddings`), norms and biases (never decayed)."""
    hidden = hidden_matrices(model)
    groups: dict[str, list[nn.Parameter]] = {"muon": [], "adamw_decay": [], "adamw": []}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in hidden:
            groups["muon"].append(p)
        elif p.dim() >= 2 and decay_embeddings:
            groups["adamw_decay"].append(p)
        else:
            groups["adamw"].append(p)
    out = [
        {"params": groups["muon"], "use_muon": True, "weight_decay": weight_decay},
        {"params": groups["adamw_decay"], "use_muon": False, "weight_decay": weight_decay},
        {"params": groups["adamw"], "use_muon": False, "weight_decay": 0.0},
    ]
    return [g for g in out if g["params"]]


class Muon(torch.optim.Optimizer):
    """Groups with `use_muon=True` (2-D parameters only) take Muon steps, the others AdamW steps
    (torch.optim.AdamW's update, bias-corrected, with decoupled weight decay).

    Every group follows the same `lr` (what the training loop's schedule sets), times the group's
    `lr_scale` (default 1). State: `momentum_buffer` per Muon matrix; `step`, `exp_avg`, `exp_avg_sq` per
    AdamW parameter; `state_dict()`/`load_state_dict()` resume exactly (torch.optim.Optimizer's own).
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if not lr > 0:
            raise LmforgeError(f"the learning rate must be positive, got {lr}.")
        if not 0 <= momentum < 1:
            raise LmforgeError(f"Muon's momentum must be in [0, 1), got {momentum}; 0.95 is the usual value.")
        if ns_steps < 1:
            raise LmforgeError(f"ns_steps must be at least 1, got {ns_steps}; 5 is the usual value.")
        defaults = dict(
            lr=lr,
            lr_scale=1.0,
            use_muon=False,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
        )
        super().__init__(list(params), defaults)
        for group in self.param_groups:
            if group["use_muon"] and any(p.dim() != 2 for p in group["params"]):
                raise LmforgeError(
                    "Muon orthogonalises 2-D weight matrices only; put vectors and embeddings in an AdamW group "
                    "(use_muon=False), as muon_param_groups does."
                )

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict[str, Any]) -> None:
        lr = group["lr"] * group["lr_scale"]
        mu = group["momentum"]
        by_shape: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.mul_(mu).add_(p.grad)
            update = p.grad.add(buf, alpha=mu) if group["nesterov"] else buf
            by_shape.setdefault(tuple(p.shape), []).append((p, update))
        # Matrices of one shape are orthogonalised as one batch: fewer, larger matmuls.
        for shape, items in by_shape.items():
            ortho = orthogonalize(torch.stack([u for _, u in items]), group["ns_steps"])
            scale = update_scale(torch.Size(shape))
            for (p, _), o in zip(items, ortho.unbind(0), strict=True):
                if group["weight_decay"]:
                    p.mul_(1 - lr * group["weight_decay"])
                p.add_(o.to(p.dtype), alpha=-lr * scale)

    def _adamw_step(self, group: dict[str, Any]) -> None:
        lr = group["lr"] * group["lr_scale"]
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = state["step"]
            m, v = state["exp_avg"], state["exp_avg_sq"]
            if group["weight_decay"]:
                p.mul_(1 - lr * group["weight_decay"])
            m.lerp_(p.grad, 1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            bias1, bias2 = 1 - beta1**t, 1 - beta2**t
            denom = (v.sqrt() / math.sqrt(bias2)).add_(group["eps"])
            p.addcdiv_(m, denom, value=-lr / bias1)
