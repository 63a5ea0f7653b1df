"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019) for lmforge's Transformer, with DTensor.

Each block splits its two matmul pairs across the TP ranks so that one all-reduce (or, with sequence
parallelism, one all-gather before and one reduce-scatter after) joins them:

    attention:  q/k/v_proj column-wise (each rank owns H/tp query heads and K/tp kv heads), o_proj row-wise
    MLP:        gate/up_proj column-wise (I/tp each), down_proj row-wise
    embedding:  row-wise over the vocabulary (V/tp rows per rank)
    output:     the [V, h] output matrix sharded over V (the embedding's own shards when tied), so the
                logits come out sharded over the vocabulary; loss parallelism keeps them that way

Sequence parallelism (Korthikanti et al. 2022) shards the activations between blocks over T, so the
norms (and the residual stream) run on T/tp tokens per rank: the layout torchtitan uses for Llama 3.

Shape letters: B batch, T tokens, h hidden, H query heads, K kv heads, D head_dim, I ffn size, V vocab.
The model file is untouched: the plan is hooks and DTensor parameters, plus each Attention instance's
head counts set to the per-rank numbers so that its `view(B, T, H, D)` sees H/tp heads.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.model import Transformer

# Block.forward passes the attention (x, cos, sin, mask, cache, layer): only x is laid out over the mesh.
_ATTN_EXTRA_ARGS = (None, None, None, None, None)


def check_tp(config: ModelConfig, degree: int) -> None:
    """Refuse, in one line naming the numbers, a model that `degree`-way tensor parallelism cannot split."""
    if degree < 1:
        raise LmforgeError(f"the tensor-parallel degree must be >= 1, got {degree}.")
    if degree == 1:
        return
    sizes = {
        "num_heads": config.num_heads,
        "num_kv_heads": config.num_kv_heads,
        "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
    }
    bad = [f"{name} {value}" for name, value in sizes.items() if value % degree]
    if bad:
        raise LmforgeError(
            f"tensor parallelism over {degree} ranks needs each of num_heads, num_kv_heads, intermediate_size and "
            f"vocab_size divisible by {degree}, but {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not; "
            f"choose a tp degree that divides them (or pad the vocabulary)."
        )


def _block_plan(post_sublayer_norms: bool, sequence_parallel: bool) -> dict[str, Any]:
    """The ParallelStyle of each sub-module of one Block."""
    # Between the two halves of a block the residual stream is Shard(1) (over T) with sequence
    # parallelism, else Replicate; the column-wise inputs are always the full sequence.
    between = Shard(1) if sequence_parallel else Replicate()
    plan: dict[str, Any] = {
        "attn": PrepareModuleInput(
            input_layouts=(between, *_ATTN_EXTRA_ARGS),
            desired_input_layouts=(Replicate(), *_ATTN_EXTRA_ARGS),
            use_local_output=True,
        ),
        "attn.q_proj": ColwiseParallel(),
        "attn.k_proj": ColwiseParallel(),
        "attn.v_proj": ColwiseParallel(),
        "attn.o_proj": RowwiseParallel(output_layouts=between),
        "mlp": PrepareModuleInput(
            input_layouts=(between,), desired_input_layouts=(Replicate(),), use_local_output=True
        ),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(output_layouts=between),
    }
    if sequence_parallel:
        # The input norms hand their Shard(1) DTensor straight to the sub-layer's PrepareModuleInput (which
        # all-gathers it); GLM-4's output norms feed the residual add, whose stream is a plain local tensor.
        plan.update({"attn_norm": SequenceParallel(), "mlp_norm": SequenceParallel()})
        if post_sublayer_norms:
            plan.update({name: SequenceParallel(use_local_output=True) for name in ("attn_out_norm", "mlp_out_norm")})
    return plan


def _norm_names(post_sublayer_norms: bool) -> list[str]:
    return ["attn_norm", "mlp_norm"] + (["attn_out_norm", "mlp_out_norm"] if post_sublayer_norms else [])


def _replicate(module: nn.Module, tp_mesh: DeviceMesh, local_output: bool) -> None:
    """Make `module`'s parameters Replicate DTensors, taking and (if `local_output`) giving plain tensors.

    Without sequence parallelism the norms need no communication, but their weights must still be DTensors:
    clip_grad_norm_ and the foreach optimizers refuse a mix of DTensors and plain tensors."""

    def to_dtensor(mod: nn.Module, inputs: tuple[Any, ...], mesh: DeviceMesh) -> tuple[Any, ...]:
        return tuple(
            DTensor.from_local(x, mesh, [Replicate()], run_check=False)
            if isinstance(x, torch.Tensor) and not isinstance(x, DTensor)
            else x
            for x in inputs
        )

    def to_local(mod: nn.Module, output: Any, mesh: DeviceMesh) -> Any:
        return output.to_local() if local_output and isinstance(output, DTensor) else output

    distribute_module(module, tp_mesh, input_fn=to_dtensor, output_fn=to_local)


def apply_tp(
    model: Transformer, tp_mesh: DeviceMesh, *, sequence_parallel: bool = True, loss_parallel: bool = False
) -> Transformer:
    """Shard `model` in place over the 1-D `tp_mesh` (see the module docstring for the plan) and return it.

    Contract afterwards: every rank feeds the same full batch (input_ids [B, T], and labels for the loss);
    with `sequence_parallel`, T must be divisible by the TP degree. The forward returns logits [B, T, V] as a
    plain tensor replicated on every rank, or, with `loss_parallel`, as a DTensor sharded over V that the
    loss must consume under `torch.distributed.tensor.parallel.loss_parallel()` (forward and backward; see
    lmforge.parallel.step.loss_context). Tied embeddings are supported: the embedding's vocabulary shards are
    the output's. Parameters become DTensors: optimizers and clip_grad_norm_ accept them as they are.
    """
    degree = tp_mesh.size()
    c = model.config
    check_tp(c, degree)
    between = Shard(1) if sequence_parallel else Replicate()
    parallelize_module(model.embed, tp_mesh, RowwiseParallel(input_layouts=Replicate(), output_layouts=between))
    model.embed.register_forward_hook(_materialize)
    for block in model.layers:
        parallelize_module(block, tp_mesh, _block_plan(c.post_sublayer_norms, sequence_parallel))
        if not sequence_parallel:
            for name in _norm_names(c.post_sublayer_norms):
                _replicate(block.get_submodule(name), tp_mesh, local_output=True)
        attn = block.attn
        # Column-wise q/k/v hand each rank contiguous heads; query head j uses kv head j // (H/K), and the
        # local heads r*H/tp + i map to local kv heads i // (H/K): grouped-query attention stays aligned.
        attn.num_heads = c.num_heads // degree
        attn.num_kv_heads = c.num_kv_heads // degree

    # Final norm: its output must be a Replicate DTensor (the full sequence), so that Transformer.head's
    # F.linear against the vocabulary-sharded output matrix produces logits sharded over V (DTensor's
    # matmul rule: Replicate x Shard(0)^T -> Shard(-1), no communication).
    if sequence_parallel:
        parallelize_module(model.norm, tp_mesh, SequenceParallel(use_local_output=False))
        parallelize_module(
            model.norm,
            tp_mesh,
            PrepareModuleOutput(output_layouts=Shard(1), desired_output_layouts=Replicate(), use_local_output=False),
        )
    else:
        _replicate(model.norm, tp_mesh, local_output=False)
    if model.lm_head is not None:
        # Transformer.head uses the weight directly (F.linear), never lm_head's forward: shard the weight only.
        weight = model.lm_head.weight
        model.lm_head.weight = nn.Parameter(
            distribute_tensor(weight.detach(), tp_mesh, [Shard(0)]), requires_grad=weight.requires_grad
        )
    if not loss_parallel:
        # Gather the vocabulary shards: callers see the model's usual plain logits [B, T, V].
        parallelize_module(
            model,
            tp_mesh,
            PrepareModuleOutput(output_layouts=Shard(-1), desired_output_layouts=Replicate(), use_local_output=True),
        )
    if sequence_parallel:
        model.register_forward_pre_hook(_check_sequence_parallel_call(degree), with_kwargs=True)
    return model


def _materialize(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    """The embedding's output as a plain tensor: DTensor's to_local hands back an AsyncCollectiveTensor (the
    collective not yet waited on), which a compiled block takes as a different input type; its compiled
    backward then returns a plain gradient where DTensor's redistribute expects a DTensor (seen on torch 2.13,
    CPU/gloo: "'Tensor' object has no attribute '_local_tensor'"). Any op waits and unwraps: one small copy."""
    return output.clone() if isinstance(output, AsyncCollectiveTensor) else output


def _check_sequence_parallel_call(degree: int) -> Any:
    """Refuse the forwards that sequence parallelism cannot run: a length the ranks cannot split, and
    `logits_to_keep`, which would slice each rank's T/tp-token shard instead of the sequence."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = args[0] if args else kwargs.get("input_ids")
        if isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[1] % degree:
            raise LmforgeError(
                f"sequence parallelism over {degree} ranks needs the sequence length divisible by {degree}, "
                f"got {ids.shape[1]} tokens; change --seq-len or turn sequence_parallel off."
            )
        keep = args[4] if len(args) > 4 else kwargs.get("logits_to_keep", 0)
        if keep:
            raise LmforgeError(
                "logits_to_keep is not supported under sequence parallelism (each rank holds a slice of the "
                "sequence); compute the full logits, or turn sequence_parallel off."
            )

    return hook
