"""Structured pruning: remove whole KV groups (attention heads) or FFN channels, the same number in every
layer (an HF config has one num_attention_heads and one intermediate_size for all layers), giving a smaller
dense model whose config is shrunk to match, so save_pretrained writes a checkpoint transformers loads.

GQA: query head j reads kv head j // G, so a kv head and its G query heads form a group, and a group goes
whole: num_key_value_heads and num_attention_heads shrink together and G = H / K stays. head_dim stays, and
the config states it explicitly (it no longer equals hidden_size / num_attention_heads).

Each layer removes its lowest-scoring groups or channels. Scores from the weights alone: ||V_g|| * ||O_g||
for a group (a head's attention weights are a convex combination, so the scale of what it writes is set by
its value and output projections; Q and K only choose where it looks), ||gate_c|| * ||up_c|| * ||down_c||
for a channel. From activations (importance.py): the mean norm of what the group or channel writes.

Removing a group or channel is exactly zeroing its o_proj columns or its down_proj column: nothing else
reads the removed rows of q, k, v, gate and up.

Shape letters: K kv heads, G query heads per kv head, D head_dim, I ffn size, h hidden.
"""

from __future__ import annotations

import torch

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.quant.importance import Activations
from lmforge.quant.prune import rounded
from lmforge.runtime import model_device


def removal_count(config: ModelConfig, method: str, sparsity: float) -> int:
    """KV groups (heads) or channels to remove per layer: round(sparsity * total), at least one, and at
    least one must stay."""
    total, what = (config.num_kv_heads, "KV groups") if method == "heads" else (config.intermediate_size, "channels")
    n = rounded(sparsity * total)
    if method == "heads" and total == 1:
        raise LmforgeError(
            "the model has a single KV group per layer: removing heads would remove all of its attention; use "
            "--method channels or magnitude."
        )
    if n == 0:
        raise LmforgeError(
            f"--sparsity {sparsity} of {total} {what} per layer removes none; use at least {0.5 / total:.3g}."
        )
    if n >= total:
        raise LmforgeError(
            f"--sparsity {sparsity} would remove {n} of the {total} {what} per layer, but at least one must stay; "
            f"use at most {(total - 1) / total:.3g}."
        )
    if method == "heads" and config.family == "llama":
        # transformers' LlamaConfig refuses hidden_size % num_attention_heads != 0 even with head_dim given
        # (its validate_architecture, transformers 5.x); Qwen2 and GLM configs take any head count.
        G, h = config.num_kv_groups, config.hidden_size
        if h % ((total - n) * G):
            ok = [f"{m / total:.3g}" for m in range(1, total) if h % ((total - m) * G) == 0]
            raise LmforgeError(
                f"--sparsity {sparsity} leaves {(total - n) * G} attention heads, which transformers' LlamaConfig "
                f"refuses (hidden_size {h} must be a multiple of num_attention_heads); "
                + (f"use --sparsity {', '.join(ok)}." if ok else "no head count works: use --method channels.")
            )
    return n


def group_scores(model: Transformer, acts: Activations | None = None) -> list[torch.Tensor]:
    """Per layer, the [K] score of each KV group (higher: more important)."""
    c = model.config
    K, D = c.num_kv_heads, c.head_dim
    scores = []
    for i, block in enumerate(model.layers):
        if acts is not None:
            scores.append(acts.group_out[i] / acts.tokens)
            continue
        v = block.attn.v_proj.weight.detach().float().reshape(K, -1)  # [K, D*h]
        o = block.attn.o_proj.weight.detach().float()  # [h, H*D]
        o = o.reshape(o.shape[0], K, c.num_kv_groups * D).transpose(0, 1).reshape(K, -1)  # [K, h*G*D]
        scores.append(v.norm(dim=1) * o.norm(dim=1))
    return scores


def channel_scores(model: Transformer, acts: Activations | None = None) -> list[torch.Tensor]:
    """Per layer, the [I] score of each FFN channel (higher: more important)."""
    scores = []
    for i, block in enumerate(model.layers):
        down = block.mlp.down_proj.weight.detach().float().norm(dim=0)  # [I]
        if acts is not None:
            scores.append(acts.channel_abs[i] / acts.tokens * down)
            continue
        gate = block.mlp.gate_proj.weight.detach().float().norm(dim=1)
        up = block.mlp.up_proj.weight.detach().float().norm(dim=1)
        scores.append(gate * up * down)
    return scores


def kept(score: torch.Tensor, n_removed: int) -> torch.Tensor:
    """Indices (ascending) of all but the `n_removed` lowest scores."""
    return torch.topk(score, score.numel() - n_removed).indices.sort().values


def _blocks(index: torch.Tensor, size: int) -> torch.Tensor:
    """Rows of the blocks `index` of `size` rows each: [n] -> [n * size]."""
    return (index[:, None] * size + torch.arange(size, device=index.device)).flatten()


def remove_heads(model: Transformer, sparsity: float, acts: Activations | None = None) -> tuple[Transformer, int]:
    """A model without the lowest-scoring round(sparsity * K) KV groups of every layer; (model, groups removed)."""
    c = model.config
    n = removal_count(c, "heads", sparsity)
    G, D = c.num_kv_groups, c.head_dim
    state = dict(model.state_dict())
    for i, score in enumerate(group_scores(model, acts)):
        groups = kept(score, n).to(model_device(model))
        q_rows, kv_rows = _blocks(groups, G * D), _blocks(groups, D)
        p = f"layers.{i}.attn."
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            state[p + name + ".weight"] = state[p + name + ".weight"].index_select(0, rows)
            if c.qkv_bias:
                state[p + name + ".bias"] = state[p + name + ".bias"].index_select(0, rows)
        state[p + "o_proj.weight"] = state[p + "o_proj.weight"].index_select(1, q_rows)  # o_proj bias stays
    K = c.num_kv_heads - n
    config = c.replace(num_kv_heads=K, num_heads=K * G, head_dim=D)
    return _rebuild(model, config, state), n


def remove_channels(model: Transformer, sparsity: float, acts: Activations | None = None) -> tuple[Transformer, int]:
    """A model without the lowest-scoring round(sparsity * I) FFN channels of every layer; (model, removed)."""
    c = model.config
    n = removal_count(c, "channels", sparsity)
    state = dict(model.state_dict())
    for i, score in enumerate(channel_scores(model, acts)):
        rows = kept(score, n).to(model_device(model))
        p = f"layers.{i}.mlp."
        for name in ("gate_proj", "up_proj"):
            state[p + name + ".weight"] = state[p + name + ".weight"].index_select(0, rows)
            if c.mlp_bias:
                state[p + name + ".bias"] = state[p + name + ".bias"].index_select(0, rows)
        state[p + "down_proj.weight"] = state[p + "down_proj.weight"].index_select(1, rows)  # down bias stays
    config = c.replace(intermediate_size=c.intermediate_size - n)
    return _rebuild(model, config, state), n


def _rebuild(model: Transformer, config: ModelConfig, state: dict[str, torch.Tensor]) -> Transformer:
    """A Transformer of `config` holding `state` (assigned, not copied), on the model's device and mode."""
    if any(".parametrizations." in k for k in state):
        raise LmforgeError("structured pruning needs a plain model; remove its parametrizations (held masks) first.")
    new = Transformer(config, device="meta")
    new.load_state_dict(state, strict=True, assign=True)
    device = model_device(model)
    if device.type != "cpu":
        new.to(device)  # the rotary tables are built on the CPU
    new.train(model.training)
    return new
