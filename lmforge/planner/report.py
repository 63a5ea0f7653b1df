"""The table `lmforge plan` prints."""

from __future__ import annotations

from lmforge.info import human
from lmforge.planner.plan import Plan


def _b(n: float) -> str:
    return human(n, "B")


def format_plan(name: str, plan: Plan) -> str:
    cfg, mem, act = plan.config, plan.memory, plan.act
    split = []
    if plan.tp > 1:
        split.append(f"1/{plan.tp} TP")
    if cfg.shards_state and plan.dp > 1:
        split.append(f"1/{plan.dp} FSDP")
    how = ", ".join(split) if split else "replicated"
    opt = "AdamW: 2 fp32 moments" if cfg.optimizer == "adamw" else "Muon: 1 moment (hidden), 2 (rest)"
    ckpt = "activation checkpointing" if cfg.activation_checkpointing else "no activation checkpointing"
    other = act.saved(not cfg.activation_checkpointing)
    saved_what = "block inputs + head" if cfg.activation_checkpointing else f"{act.num_layers} blocks + head"
    precision = "float32"
    if cfg.dtype == "bfloat16":
        precision = "bf16 weights gathered by FSDP" if cfg.bf16_params else "bf16 autocast"
    rows = [
        ("weights", f"fp32, {how}", mem["weights"], ""),
        ("gradients", f"fp32, {how}", mem["gradients"], ""),
    ]
    if "grad_buckets" in mem:
        rows.append(("grad buckets", "DDP's flat copy of the gradients", mem["grad_buckets"], ""))
    rows += [
        ("optimizer", f"{opt}, {how}", mem["optimizer"], ""),
        (
            "activations",
            f"saved for backward: {saved_what}",
            mem["activations"],
            f"{'without' if cfg.activation_checkpointing else 'with'} checkpointing: {_b(other)}",
        ),
    ]
    if mem["fsdp_gathered"]:
        dtype = "bf16" if cfg.bf16_params else "fp32"
        rows.append(("fsdp gathered", f"root + 2 blocks all-gathered, {dtype}", mem["fsdp_gathered"], "transient"))
    if mem["autocast_cache"]:
        rows.append(("autocast cache", "bf16 weight copies until the forward ends", mem["autocast_cache"], "transient"))
    if mem["recompute"]:
        rows.append(("recompute", "one block rebuilt in the backward pass", mem["recompute"], "transient"))
    rows.append(("loss backward", "two fp32 [B*T, V] gradients", mem["loss_backward"], "transient"))
    rows.append(("block backward", "SwiGLU's gradients, the residual's", mem["block_backward"], "transient"))
    if mem["optimizer_step"]:
        rows.append(("optimizer step", "Muon's update buffers", mem["optimizer_step"], "transient"))
    rows.append(("peak", f"modelled: at the {plan.peak_moment}", mem["peak"], ""))

    t, kv = plan.throughput, plan.kv_cache
    lines = [
        f"{name} ({human(plan.params)} parameters): {cfg.strategy} on {cfg.gpus} GPU{'s' if cfg.gpus > 1 else ''} "
        f"(dp {plan.dp}, tp {plan.tp}); {cfg.batch_size} x {cfg.seq_len} tokens per micro-batch, "
        f"{cfg.grad_accum} per step; {precision}, {cfg.optimizer}, {ckpt}; {cfg.kernels} kernels",
        "memory per device",
    ]
    for label, what, value, extra in rows:
        lines.append(f"  {label:<16}{what:<44}{_b(value):>11}" + (f"  ({extra})" if extra else ""))
    parts = ", ".join(f"{k} {_b(v)}" for k, v in act.per_block.items())
    lines.append(f"  one block, no checkpointing: {_b(act.block)} = {parts}")
    lines.append("  once per micro-batch: " + ", ".join(f"{k} {_b(v)}" for k, v in act.once.items()))
    lines.append(
        f"KV cache (inference, {kv['dtype']}): {_b(kv['bytes_per_token'])} per token per device; "
        f"{_b(kv['bytes'])} for {cfg.batch_size} x {cfg.seq_len} tokens"
    )
    lines.append(
        f"step: {human(t['flops_per_token'])} FLOPs/token x {t['tokens_per_step']:,} tokens at {cfg.mfu:.0%} MFU of "
        f"{human(cfg.gpu_flops, 'FLOP/s')} per GPU: {t['step_time_s']:.3g} s/step, {t['tokens_per_s']:,.0f} tokens/s "
        f"({t['tokens_per_s_per_device']:,.0f} per GPU)"
    )
    lines.append("notes")
    lines += [f"  - {n}" for n in plan.notes]
    return "\n".join(lines)
