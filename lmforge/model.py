"""The decoder shared by Llama 3, Qwen 2.5 and GLM-4, in one file.

    x = embed(ids)
    per layer:  x = x + [norm](Attn(RMSNorm(x)));  x = x + [norm](MLP(RMSNorm(x)))
    logits = lm_head(RMSNorm(x))

The families differ only in the config fields named in REFERENCE.md section 1 (q/k/v and o bias, RoPE
layout and partial rotary dims, GLM-4-0414's extra norms on each sub-layer's output, tied embeddings).
The model maps token ids to logits and nothing else: loss, sampling, LoRA and parallelism are applied
from outside.

Shape letters: B batch, T new tokens, S key/value slots (past + new), h hidden, H query heads,
K kv heads, G = H/K query heads per kv head, D head_dim, I ffn size, V vocab.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig
from lmforge.rope import RotaryEmbedding, apply_rope


class Cache(Protocol):
    """What the model needs from a KV cache: somewhere to put this forward's keys and values.

    Where they go (slots, rows, blocks) is the caller's business, decided before the forward
    (lmforge.generate.kv_cache for one static batch, lmforge.generate.paged for the engine's blocks); the
    model never advances or inspects a cache."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new k, v [B, K, T, D]; return the S slots attention reads, [B, K, S, D]."""
        ...


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): statistics in fp32, cast back, then scale.

    The order (cast to the input dtype BEFORE multiplying by the weight) is the reference's; in bf16 the
    other order gives different results."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    """Grouped-query attention (Ainslie et al. 2023): H query heads share K kv heads; scale D**-0.5."""

    def __init__(self, c: ModelConfig, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.interleaved = c.rope_interleaved
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias, dtype=dtype)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias, dtype=dtype)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias, dtype=dtype)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.o_bias, dtype=dtype)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: Cache | None,
        layer: int,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(B, T, K, D).transpose(1, 2)  # [B, K, T, D]
        v = self.v_proj(x).view(B, T, K, D).transpose(1, 2)  # [B, K, T, D]
        q = apply_rope(q, cos, sin, self.interleaved)
        k = apply_rope(k, cos, sin, self.interleaved)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # [B, K, S, D]
        if T == 1 and H != K:
            # One query token: fold the G query heads of each kv head into the query-length axis, so
            # attention runs on K heads without copying the cache G times.
            q = q.view(B, K, H // K, D)  # [B, K, G, D]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, K, G, D]
            y = y.reshape(B, 1, H * D)
        elif q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # CPU autocast would run attention in bf16, whose SDPA kernels are slower on CPU than the fp32
            # ones (forward + backward, measured: docs/LOG.md); fp32 is also the more exact choice.
            with torch.autocast("cpu", enabled=False):
                y = _sdpa(q.float(), k.float(), v.float(), mask)
            y = y.transpose(1, 2).reshape(B, T, H * D)
        else:
            y = _sdpa(q, k, v, mask).transpose(1, 2).reshape(B, T, H * D)
        return self.o_proj(y)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention of q [B, H, T, D] over k, v [B, K, S, D] -> [B, H, T, D]."""
    T = q.shape[2]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=q.shape[1] != k.shape[1]
    )


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, c: ModelConfig, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias, dtype=dtype)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias, dtype=dtype)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One pre-norm decoder layer; GLM-4-0414 also normalises each sub-layer's output."""

    def __init__(self, c: ModelConfig, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(c.hidden_size, c.norm_eps, dtype)
        self.attn = Attention(c, dtype)
        self.mlp_norm = RMSNorm(c.hidden_size, c.norm_eps, dtype)
        self.mlp = MLP(c, dtype)
        self.attn_out_norm = RMSNorm(c.hidden_size, c.norm_eps, dtype) if c.post_sublayer_norms else None
        self.mlp_out_norm = RMSNorm(c.hidden_size, c.norm_eps, dtype) if c.post_sublayer_norms else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: Cache | None,
        layer: int,
    ) -> torch.Tensor:
        a = self.attn(self.attn_norm(x), cos, sin, mask, cache, layer)
        if self.attn_out_norm is not None:
            a = self.attn_out_norm(a)
        x = x + a
        m = self.mlp(self.mlp_norm(x))
        if self.mlp_out_norm is not None:
            m = self.mlp_out_norm(m)
        return x + m


class Transformer(nn.Module):
    """Token ids [B, T] -> logits [B, T, V].

    Built on the meta device (no memory), then either initialised here (std `initializer_range`, norms
    1, biases 0) or, with `device="meta"`, left empty for a loader to fill with
    `load_state_dict(..., assign=True)`.
    """

    def __init__(
        self, config: ModelConfig, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.config = c = config
        with torch.device("meta"):
            # Passing the (meta) weight skips Embedding.reset_parameters, whose normal_ imports torch._dynamo
            # on first use (~0.75 s); init_weights() initialises it below.
            weight = torch.empty(c.vocab_size, c.hidden_size, dtype=dtype)
            self.embed = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.padding_idx, _weight=weight)
            self.layers = nn.ModuleList(Block(c, dtype) for _ in range(c.num_layers))
            self.norm = RMSNorm(c.hidden_size, c.norm_eps, dtype)
            self.lm_head = None if c.tie_embeddings else nn.Linear(c.hidden_size, c.vocab_size, bias=False, dtype=dtype)
        self.rope = RotaryEmbedding(c)
        if str(device) != "meta":
            self.to_empty(device=device or "cpu")
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, initializer_range) for matrices and embeddings, zero biases, unit norms."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std, generator=generator)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    @property
    def output_weight(self) -> torch.Tensor:
        """The [V, h] matrix that produces logits (the embedding itself when tied)."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Logits [B, T, V] (only the last `logits_to_keep` positions when it is > 0).

        position_ids: [B, T] or [T]; default past+0 .. past+T-1. Given without a mask and without a cache,
            a position that does not follow its predecessor starts a new document (packed sequences):
            attention is then block-diagonal causal, as in transformers. Or [B, T, 2]: GLM's 2D positions
            (#1 in the corrupted text, #2 inside a span; 2D RoPE, see rope.py), which never imply packing:
            attention is causal unless a mask is given (GLM's own is the [B, 1, T, S] prefix mask).
        attention_mask: without a cache, [B, T] with 1 for real tokens and 0 for padding, or a boolean
            [B, 1, T, T] "may attend" mask used as given (e.g. GLM's prefix-bidirectional mask).
        cache: a KV cache (see `Cache`). The caller then owns positions and masks: `position_ids` are
            required, and `attention_mask` is the boolean [B, 1, T, S] mask over the S slots the cache
            returns, or None for one new token (T = 1) that may see every slot.
        """
        B, T = input_ids.shape
        if cache is not None:
            if position_ids is None:
                raise ValueError("with a KV cache, pass position_ids: the caller decides where tokens go")
            if attention_mask is None and T > 1:
                raise ValueError("with a KV cache and several new tokens, pass the [B, 1, T, S] attention mask")
            if attention_mask is not None and attention_mask.dim() != 4:
                raise ValueError("with a KV cache, attention_mask is the boolean [B, 1, T, S] mask")
        user_positions = position_ids is not None
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)
        if position_ids.dim() == 1:
            position_ids = position_ids.expand(B, T)
        elif position_ids.dim() == 3:  # 2D positions [B, T, 2]
            position_ids = position_ids.expand(B, T, position_ids.shape[-1])
        packed = user_positions and attention_mask is None and cache is None and position_ids.dim() == 2
        if cache is not None:
            mask = attention_mask.bool() if attention_mask is not None else None
        else:
            mask = build_attention_mask(attention_mask, position_ids if packed else None, T)

        x = self.embed(input_ids)  # [B, T, h]
        cos, sin = self.rope(position_ids, x.dtype)  # [B, 1, T, R]
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, mask, cache, i)
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        return self.head(x)  # [B, T, V]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and output projection: hidden states [B, T, h] -> logits [B, T, V]. The projection is a
        module when there is one, so passes from outside (quantization) can replace it."""
        h = self.norm(x)
        return F.linear(h, self.embed.weight) if self.lm_head is None else self.lm_head(h)


def build_attention_mask(
    attention_mask: torch.Tensor | None, packed_positions: torch.Tensor | None, T: int
) -> torch.Tensor | None:
    """A boolean "may attend" mask [B, 1, T, T] for a forward without a cache, or None when plain causal
    attention suffices.

    A padding mask removes padded tokens; packed positions (a position that is not its predecessor + 1
    starts a new document) keep each token inside its document. A query row with nothing left to attend
    to (a padding token) attends to every token instead, so that it yields finite garbage rather than NaN.
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask.bool()
    if attention_mask is None and packed_positions is None:
        return None  # SDPA's is_causal fast path
    device = attention_mask.device if attention_mask is not None else packed_positions.device
    slot = torch.arange(T, device=device)
    allowed = (slot[None, :] <= slot[:, None])[None, None]  # [1, 1, T, T]
    if packed_positions is not None:
        first = packed_positions[:, :1] - 1
        doc = (torch.diff(packed_positions, prepend=first, dim=-1) != 1).cumsum(-1)  # [B, T]
        if attention_mask is None and not bool(doc[:, -1].any()):
            return None  # no document boundary anywhere: plain causal
        allowed = allowed & (doc[:, None, :, None] == doc[:, None, None, :])  # [B, 1, T, T]
    if attention_mask is not None:
        if attention_mask.shape[-1] != T:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} tokens, expected {T}")
        allowed = allowed & attention_mask.bool()[:, None, None, :]  # [B, 1, T, T]
    return allowed | ~allowed.any(-1, keepdim=True)
