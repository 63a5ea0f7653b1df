"""`plan_training`: per-device memory of a training step, the KV cache for inference, and the step time.

Memory terms (bytes on one device):
  weights, gradients  fp32, split by TP (and by the dp degree under FSDP); DDP also keeps its gradient
                      buckets (another copy of the gradients unless gradient_as_bucket_view=True)
  optimizer           AdamW: two fp32 moments (+ a 4-byte step per tensor); Muon: one for hidden matrices
  activations         saved for the backward pass (lmforge.planner.activations): split by TP in the
                      attention and MLP, and in the norms and residual stream with sequence parallelism;
                      not split by FSDP or DDP (each rank has its own micro-batch)
  fsdp_gathered       the root unit (embedding, final norm, head), gathered for the whole step, and two
                      blocks (running, prefetched), in bf16 when FSDP's mixed precision gathers bf16
  peak                weights + optimizer + fsdp_gathered + the largest of four moments of the step:
                      the loss's forward (activations + autocast's weight cache + the logits), the loss's
                      backward (activations + two fp32 [n, V] gradients), the last block's backward
                      (activations - head + the head's gradient + the block's backward temporaries, + the
                      block's rebuilt activations under checkpointing), and the optimizer step (all
                      gradients, plus Muon's update buffers)
Step time: training_flops_per_token (lmforge.train.perf) x tokens per step / (gpus x gpu_flops x mfu). MFU
counts model FLOPs only, so the recomputation of activation checkpointing shows up as a lower MFU, not as
more FLOPs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.planner.activations import BF16, Activations, Layout, activations
from lmforge.planner.config import PlanConfig
from lmforge.planner.params import (
    FP32,
    Param,
    block_params,
    fsdp_gathered_bytes,
    model_params,
    optimizer_bytes,
    weight_bytes,
)
from lmforge.train.perf import training_flops_per_token


@dataclass(frozen=True)
class Plan:
    """What `lmforge plan` prints: every number is bytes on one device unless its name says otherwise."""

    config: PlanConfig
    model: ModelConfig
    params: int
    dp: int
    tp: int
    memory: dict[str, int]  # weights, gradients, [grad_buckets,] optimizer, activations, transients, peak
    peak_moment: str  # which moment of the step sets the peak
    moments: dict[str, int]  # the peak's candidates: bytes at each moment, over weights + optimizer (+ gather)
    act: Activations
    kv_cache: dict[str, Any]
    throughput: dict[str, float]
    notes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        a = self.act
        return {
            "params": self.params,
            "parallel": {"strategy": self.config.strategy, "gpus": self.config.gpus, "dp": self.dp, "tp": self.tp},
            "plan": self.config.to_dict(),
            "memory": self.memory,
            "peak_moment": self.peak_moment,
            "moments": self.moments,
            "activations": {
                "per_block": a.per_block,
                "block": a.block,
                "block_input": a.block_input,
                "once": a.once,
                "micro_batches": a.micro_batches,
                "without_checkpointing": a.saved(False),
                "with_checkpointing": a.saved(True),
                "recompute": a.recompute,
                "loss_backward": a.loss_backward,
            },
            "kv_cache": self.kv_cache,
            "throughput": self.throughput,
            "notes": list(self.notes),
        }


def check_parallel(model: ModelConfig, cfg: PlanConfig) -> None:
    """Refuse a TP degree the model's shapes cannot be split by, and a sequence longer than its context."""
    tp = cfg.tp_degree
    sizes = {
        "num_heads": model.num_heads,
        "num_kv_heads": model.num_kv_heads,
        "intermediate_size": model.intermediate_size,
        "vocab_size": model.vocab_size,  # lmforge.parallel.tp splits the embedding and head evenly
    }
    for what, size in sizes.items():
        if size % tp:
            common = math.gcd(*sizes.values())
            ok = [d for d in range(2, common + 1) if common % d == 0][:4]
            raise LmforgeError(
                f"tensor parallelism splits {what} over the TP group, but {what} {size} is not divisible by tp {tp}; "
                "tp must divide "
                + ", ".join(f"{k} {v}" for k, v in sizes.items())
                + (f" (e.g. {', '.join(map(str, ok))})." if ok else ".")
            )
    if tp > 1 and cfg.sequence_parallel and cfg.seq_len % tp:
        raise LmforgeError(
            f"sequence parallelism splits each sequence over the {tp} TP ranks, but seq_len {cfg.seq_len} is not "
            f"divisible by {tp}; change --seq-len or pass --no-sequence-parallel."
        )
    limit = model.max_position_embeddings
    if cfg.seq_len > limit:
        raise LmforgeError(
            f"seq_len {cfg.seq_len} exceeds the model's context of {limit} tokens (max_position_embeddings); "
            "lower --seq-len."
        )


def plan_training(model: ModelConfig, cfg: PlanConfig) -> Plan:
    """The per-device memory, KV cache and step time of training `model` as `cfg` describes."""
    check_parallel(model, cfg)
    tp, dp = cfg.tp_degree, cfg.dp_degree
    shard = dp if cfg.shards_state else 1
    params = model_params(model)
    weights = weight_bytes(params, tp, shard)
    optimizer = optimizer_bytes(params, cfg.optimizer, tp, shard)
    lay = layout(cfg)
    act = activations(
        model, cfg.batch_size, cfg.seq_len, lay, cfg.kernels, cfg.grad_accum, cfg.activation_checkpointing
    )
    memory = {"weights": weights, "gradients": weights}
    if cfg.strategy == "ddp" and cfg.gpus > 1:
        memory["grad_buckets"] = weights
    memory["optimizer"] = optimizer
    memory["activations"] = act.saved()
    gathered = cfg.shards_state and dp > 1
    memory["fsdp_gathered"] = fsdp_gathered_bytes(params, model, tp, lay.params) if gathered else 0
    memory["autocast_cache"] = act.autocast_cache
    memory["recompute"] = act.recompute
    memory["loss_forward"] = act.loss_forward
    memory["loss_backward"] = act.loss_backward
    memory["block_backward"] = act.block_backward
    memory["optimizer_step"] = _optimizer_step_bytes(params, cfg, tp, shard)

    grads = memory["gradients"] + memory.get("grad_buckets", 0)
    output = "embed.weight" if model.tie_embeddings else "lm_head.weight"
    out_weight = sum(p.local_numel(tp, 1) for p in params if p.name == output)
    if gathered:
        # FSDP reduce-scatters the root's gradients at the end of the backward: until then the output
        # weight's is whole (in the gathered dtype), and each block's is whole until its reduce-scatter,
        # cast to fp32 first when it is bf16 (reduce_dtype fp32).
        block = sum(p.local_numel(tp, 1) for p in block_params(model))
        head_grad = lay.params * out_weight
        unsharded = block * (lay.params + (FP32 if lay.params != FP32 else 0))
    else:
        head_grad, unsharded = FP32 * out_weight // shard, 0
    # In the backward pass of the last block the first micro-batch's head has been freed, and the output
    # weight's gradient exists; under checkpointing that block's activations have just been rebuilt.
    in_block = memory["activations"] - act.once["head"] + head_grad + act.recompute + act.block_backward + unsharded
    moments = {
        "loss forward": memory["activations"] + act.autocast_cache + act.loss_forward,
        "loss backward": memory["activations"] + act.loss_backward,
        "last block's backward": in_block,
        "optimizer step": grads + memory["optimizer_step"],
    }
    moment = max(moments, key=lambda k: moments[k])
    base = weights + optimizer + memory["fsdp_gathered"]
    memory["peak"] = base + moments[moment]

    flops = training_flops_per_token(model, cfg.seq_len)
    tokens = cfg.batch_size * cfg.seq_len * cfg.grad_accum * dp
    step_s = flops * tokens / (cfg.gpus * cfg.gpu_flops * cfg.mfu)
    throughput = {
        "flops_per_token": flops,
        "tokens_per_step": tokens,
        "step_time_s": step_s,
        "tokens_per_s": tokens / step_s,
        "tokens_per_s_per_device": tokens / step_s / cfg.gpus,
    }
    return Plan(
        config=cfg,
        model=model,
        params=sum(p.numel for p in params),
        dp=dp,
        tp=tp,
        memory=memory,
        peak_moment=moment,
        moments=moments,
        act=act,
        kv_cache=kv_cache(model, cfg),
        throughput=throughput,
        notes=_notes(model, cfg),
    )


def layout(cfg: PlanConfig) -> Layout:
    """Precision and tensor-parallel split of one device's forward, as lmforge.parallel.parallelize sets it up."""
    compute = FP32 if cfg.dtype == "float32" else BF16
    tp = cfg.tp_degree
    return Layout(
        compute=compute,
        params=BF16 if cfg.bf16_params else FP32,
        tp=tp,
        sequence_parallel=cfg.sequence_parallel and tp > 1,
        loss_parallel=cfg.loss_parallel and tp > 1,
    )


def _optimizer_step_bytes(params: list[Param], cfg: PlanConfig, tp: int, shard: int) -> int:
    """Temporaries of optimizer.step(): none for fused AdamW. Muon (lmforge.train.muon) holds one update per
    hidden matrix, then orthogonalises the matrices of one shape as a stack of S elements: with its
    normalised copy x, the Gram matrices (Q elements, r x r in the wide orientation) and the terms of
    `a * x + (b * gram + c * gram @ gram) @ x`, at most 5S + Q (or 3S + 4Q) are alive. Shards are taken as
    the matrices (how Muon runs on sharded DTensors is not modelled)."""
    if cfg.optimizer != "muon":
        return 0
    groups: dict[tuple[int, ...], list[int]] = {}
    for p in params:
        if p.hidden:
            shape = p.local_shape(tp, shard)
            groups.setdefault(shape, []).append(math.prod(shape))
    updates = sum(sum(g) for g in groups.values())
    stack = 0
    for shape, sizes in groups.items():
        s, q = sum(sizes), len(sizes) * min(shape) ** 2
        stack = max(stack, 5 * s + q, 3 * s + 4 * q)
    return FP32 * (updates + stack)


def kv_cache(model: ModelConfig, cfg: PlanConfig) -> dict[str, Any]:
    """K and V of every layer for inference in --dtype, split over the kv heads by TP."""
    c = model
    nbytes = 4 if cfg.dtype == "float32" else 2
    per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * nbytes // cfg.tp_degree
    return {
        "dtype": cfg.dtype,
        "bytes_per_token": per_token,
        "tokens": cfg.seq_len * cfg.batch_size,
        "bytes": per_token * cfg.seq_len * cfg.batch_size,
    }


def _notes(model: ModelConfig, cfg: PlanConfig) -> tuple[str, ...]:
    notes = ["weights, gradients and optimizer state are fp32 (lmforge keeps fp32 master weights)"]
    if cfg.bf16_params:
        notes.append(
            "FSDP all-gathers bf16 copies of the weights (MixedPrecisionPolicy, as lmforge.parallel does) and "
            "reduces gradients in fp32; the residual stream is bf16"
        )
    elif cfg.dtype == "bfloat16":
        notes.append(
            "bf16 compute is autocast over the fp32 weights: every matmul weight is cast to bf16 in each forward, "
            "and the copies are saved for the backward pass and, checkpointing or not, held by autocast's "
            "weight cache until the forward's autocast region ends"
        )
        if cfg.shards_state and cfg.dp_degree > 1:
            notes.append("FSDP does not shard those bf16 copies: they are casts of the all-gathered weights")
    if cfg.grad_accum > 1:
        notes.append(
            f"lmforge's loop runs all {cfg.grad_accum} forward passes of a step before the backward passes, so "
            "every micro-batch's activations are held at once"
        )
    if cfg.kernels == "cuda":
        probs = 4 * cfg.batch_size * model.num_heads // cfg.tp_degree * cfg.seq_len**2
        notes.append(
            "attention assumes flash / cuDNN / efficient SDPA (O(T) saved); the math fallback saves the "
            f"[B, H, T, T] probabilities: {_human(probs)} more per block"
        )
    else:
        notes.append("attention follows lmforge's CPU path: SDPA in fp32 (flash kernel for CPU, O(T) saved)")
    if cfg.tp_degree > 1:
        split = "the attention and MLP activations"
        if cfg.sequence_parallel:
            split += (
                ", the norms and the residual stream (sequence parallelism; a norm's all-gathered output stays whole)"
            )
        whole = "the logits" if not cfg.loss_parallel else ""
        if not cfg.sequence_parallel:
            whole = "the norms, the residual stream" + (" and the logits" if whole else "")
        notes.append(f"TP splits {split}" + (f"; {whole} stay whole on every rank" if whole else ""))
    notes.append("communication buffers, allocator fragmentation and the CUDA context (~0.5-1 GB) are not counted")
    return tuple(notes)


def _human(n: float) -> str:
    from lmforge.info import human

    return human(n, "B")
