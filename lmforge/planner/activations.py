"""Bytes autograd saves for the backward pass of lmforge's decoder, op by op (lmforge/model.py).

Derived from what each op of the forward saves, and checked against torch.autograd.graph.saved_tensors_hooks
on CPU in tests/test_plan.py: a tensor shared by several ops is counted once, parameters are not counted
(they are weights), and the residual stream is counted where it is saved, by the norm that reads it.

Shape letters: n tokens of one micro-batch on one device (batch x seq_len), h hidden, H query heads,
K kv heads, D head_dim, R rotary dims, I ffn size, V vocab, t tensor-parallel degree, s the split of the
norms and residual stream (t with sequence parallelism, else 1), e compute bytes (2 under bf16, 4 in
float32), r bytes of the parameters the forward reads and so of the residual stream (4 for lmforge's fp32
weights under autocast; 2 when FSDP all-gathers bf16 parameters, MixedPrecisionPolicy).

Per block, without activation checkpointing:
  each pre-norm RMSNorm   (4nh fp32 input or its fp32 copy + 4n rsqrt + r nh normalised input) / s, and
                          its output as the next matmuls save it, whole (all-gathered under sequence
                          parallelism): one e nh tensor when r = e, else one autocast cast per consuming
                          matmul, e nh each (3 for q/k/v, 2 for gate/up)
  attention               q and k after RoPE, v, the output, and the log-sum-exp (4nH/t): flash-style kernels
                          save O(n), not the T x T probabilities. cuda: q/k/v/out in e bytes (autocast casts
                          SDPA's inputs), o_proj reads a view of the output. cpu: lmforge runs SDPA in fp32
                          under autocast (model.py), so q/k/v/out are 4 bytes and o_proj saves its own bf16
                          cast (2nHD/t); in float32 with partial rotary dims the output is laid out
                          [B, H, T, D] and o_proj's input is a contiguous copy (4nHD/t)
  RoPE                    nothing per block: x*cos + rotate(x)*sin saves only cos and sin, shared by all blocks
  SwiGLU MLP              gate out, up out, silu(gate), their product: 4 e nI/t
  GLM-4-0414 post norms   (4nh fp32 copy + 4n + e nh normalised) / s each
  autocast weight copies  with fp32 weights and bf16 compute, a bf16 copy of every matmul weight (2 bytes x
                          block matrices / t), saved by the matmul that used it
Once per micro-batch: cos and sin (2 r nR), token ids and labels (16n), the final norm (a pre-norm with one
consumer), the output head's bf16 weight copy under autocast (2Vh/t) and the fp32 log-softmax of the logits
that cross-entropy saves (4nV: autocast runs it in fp32; divided by t only with a vocab-parallel loss).
With activation checkpointing each block saves only its input (r nh / s); one block's full set is rebuilt
at a time in the backward pass. Autocast's weight cache keeps the bf16 copies of every block's weights until
the forward's autocast region ends, checkpointing or not. The loss's forward holds the logits (and their
fp32 copy under autocast), its backward two fp32 [n, V] tensors, and a block's backward three [n, I]
gradients around SwiGLU's product (e bytes, split by TP) and two of the residual stream (r nh / s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmforge.config import ModelConfig

FP32 = 4
BF16 = 2
INT64 = 8


@dataclass(frozen=True)
class Layout:
    """How one device runs the model: precision and the tensor-parallel split."""

    compute: int  # e: bytes of the matmuls' inputs and outputs
    params: int  # r: bytes of the parameters the forward reads (and of the residual stream)
    tp: int = 1
    sequence_parallel: bool = False
    loss_parallel: bool = False

    @property
    def seq_split(self) -> int:
        return self.tp if self.sequence_parallel else 1

    @property
    def vocab_split(self) -> int:
        return self.tp if self.loss_parallel else 1

    @property
    def weight_copies(self) -> bool:
        """Autocast casts fp32 weights to the bf16 compute dtype in every forward."""
        return self.params == FP32 and self.compute == BF16


def _prenorm(n: int, h: int, lay: Layout, consumers: int) -> int:
    """A pre-norm RMSNorm on the residual stream feeding `consumers` matmuls."""
    e, r = lay.compute, lay.params
    inside = (FP32 * n * h + FP32 * n + r * n * h) // lay.seq_split
    return inside + e * n * h * (1 if r == e else consumers)


def _postnorm(n: int, h: int, lay: Layout) -> int:
    """GLM-4-0414's RMSNorm on a sub-layer's output (e bytes), read by the residual add (which saves nothing)."""
    return (FP32 * n * h + FP32 * n + lay.compute * n * h) // lay.seq_split


def block_terms(config: ModelConfig, n: int, lay: Layout, kernels: str) -> dict[str, int]:
    """Saved bytes of one block for n tokens on one device, by part."""
    c = config
    h, H, K, D, I = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    e, t = lay.compute, lay.tp
    hd, kd = n * H * D // t, n * K * D // t  # elements of q (and the output) and of k (and v) per device
    lse = FP32 * n * H // t
    if kernels == "cuda":
        attention = e * (2 * hd + 2 * kd) + lse
    else:
        o_input = BF16 * hd if e == BF16 else (FP32 * hd if c.rotary_dim < D else 0)
        attention = FP32 * (2 * hd + 2 * kd) + lse + o_input
    terms = {
        "attn_norm": _prenorm(n, h, lay, 3),
        "attention": attention,
        "mlp_norm": _prenorm(n, h, lay, 2),
        "mlp": 4 * e * n * I // t,
    }
    if c.post_sublayer_norms:
        terms["post_norms"] = 2 * _postnorm(n, h, lay)
    if lay.weight_copies:
        terms["weight_copies"] = BF16 * block_matrix_elements(c) // t
    return terms


def block_matrix_elements(config: ModelConfig) -> int:
    """Elements of one block's matmul weights (q, k, v, o, gate, up, down)."""
    c = config
    h, H, K, D, I = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    return h * H * D + 2 * h * K * D + H * D * h + 3 * h * I


def once_terms(config: ModelConfig, n: int, lay: Layout) -> dict[str, int]:
    """Saved bytes outside the blocks, once per micro-batch on one device."""
    c = config
    head = _prenorm(n, c.hidden_size, lay, 1) + FP32 * n * c.vocab_size // lay.vocab_split
    if lay.weight_copies:
        head += BF16 * math.ceil(c.vocab_size / lay.tp) * c.hidden_size
    return {"rope": 2 * lay.params * n * c.rotary_dim, "tokens": 2 * INT64 * n, "head": head}


@dataclass(frozen=True)
class Activations:
    """Activation memory of one device for one optimizer step (all `micro_batches`)."""

    per_block: dict[str, int]  # one block without checkpointing, by part
    once: dict[str, int]  # rope tables, token ids, head (per micro-batch)
    block_input: int  # what a checkpointed block saves: its input
    num_layers: int
    micro_batches: int  # micro-batches whose graphs are alive together (lmforge's loop: all of a step)
    checkpointing: bool
    loss_forward: int  # the logits (e bytes) and, under bf16, their fp32 copy for the log-softmax
    loss_backward: int  # the two fp32 [n, V] gradients the loss's backward holds together
    block_backward: int  # a block's backward: three [n, I] gradients of SwiGLU's product, two residual ones

    @property
    def block(self) -> int:
        return sum(self.per_block.values())

    def saved(self, checkpointing: bool | None = None) -> int:
        """Bytes saved for the backward pass at the end of the forward passes."""
        ckpt = self.checkpointing if checkpointing is None else checkpointing
        blocks = self.num_layers * (self.block_input if ckpt else self.block)
        return self.micro_batches * (blocks + sum(self.once.values()))

    @property
    def recompute(self) -> int:
        """With checkpointing: one block's activations, rebuilt during the backward pass."""
        return self.block if self.checkpointing else 0

    @property
    def autocast_cache(self) -> int:
        """bf16 weight copies autocast keeps (its weight cache) until the autocast region of a forward ends,
        beyond those already saved: under checkpointing the blocks save none, but the cache holds them all."""
        return self.num_layers * self.per_block.get("weight_copies", 0) if self.checkpointing else 0


def activations(
    config: ModelConfig,
    batch_size: int,
    seq_len: int,
    lay: Layout,
    kernels: str,
    micro_batches: int = 1,
    checkpointing: bool = False,
) -> Activations:
    c = config
    n = batch_size * seq_len
    e, r, v = lay.compute, lay.params, c.vocab_size // lay.vocab_split
    return Activations(
        per_block=block_terms(c, n, lay, kernels),
        once=once_terms(c, n, lay),
        block_input=r * n * c.hidden_size // lay.seq_split,
        num_layers=c.num_layers,
        micro_batches=micro_batches,
        checkpointing=checkpointing,
        loss_forward=(e + (FP32 if e == BF16 else 0)) * n * v,
        loss_backward=2 * FP32 * n * v,
        block_backward=3 * e * n * c.intermediate_size // lay.tp + 2 * r * n * c.hidden_size // lay.seq_split,
    )
