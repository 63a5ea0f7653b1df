"""The one training loop, shared by pretraining and every fine-tuning objective.

Per step: fetch `grad_accum` micro-batches, sum their losses divided by the step's total weight (so the
gradient is the exact mean), clip, and step AdamW, unless the loss or gradient is not finite, in which
case the step is skipped and counted. Logs every step to metrics.jsonl, evaluates and checkpoints on a
schedule, and on Ctrl-C / SIGTERM finishes the step, saves and returns.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lmforge.data.loader import RankShare
from lmforge.errors import LmforgeError, warn
from lmforge.model import Transformer
from lmforge.parallel.dcp import has_sharded, load_plain_optimizer, load_sharded
from lmforge.parallel.mesh import ParallelConfig, build_mesh
from lmforge.parallel.parallelize import parallelize
from lmforge.parallel.step import dp_coords, loss_context
from lmforge.progress import Progress
from lmforge.runtime import autocast, is_rank0, model_device, probe_precision, training_dtype, world_size
from lmforge.train.checkpoints import load_trainer_state, rng_state, save_checkpoint, save_distributed, set_rng_state
from lmforge.train.config import TrainConfig
from lmforge.train.metrics import MetricsLog
from lmforge.train.objectives import Objective, causal_lm
from lmforge.train.optim import build_optimizer, lr_multiplier
from lmforge.train.perf import matmul_peak_flops, training_flops_per_token, tune_allocator
from lmforge.train.step import forward_backward, optimizer_step


@dataclass
class TrainResult:
    steps: int
    tokens: int
    elapsed_s: float
    final_loss: float
    val_loss: float | None = None
    val_bpb: float | None = None
    skipped_steps: int = 0
    interrupted: bool = False
    checkpoint: Path | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked between steps (main thread only)."""

    def __init__(self) -> None:
        self.stop = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stop:  # a second Ctrl-C: stop right away
            raise KeyboardInterrupt
        self.stop = True

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


@torch.no_grad()
def evaluate(
    model: Transformer,
    batches: Iterator[dict[str, torch.Tensor]],
    objective: Objective = causal_lm,
    token_bytes: torch.Tensor | None = None,
    max_batches: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Mean loss (and the objective's statistics) over the batches, and bits per byte when the byte length of
    each token is known."""
    was_training = model.training
    model.eval()
    loss_sum, weight, nbytes = 0.0, 0.0, 0
    stats: dict[str, float] = {}
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        with autocast(autocast_dtype, model_device(model)):
            out = objective(model, batch)
        loss_sum += float(out.loss_sum)
        weight += float(out.weight)
        for name, value in (out.stats or {}).items():
            stats[name] = stats.get(name, 0.0) + float(value)
        if token_bytes is not None:
            labels = batch["labels"]
            nbytes += int(token_bytes[labels.clamp(min=0)][labels >= 0].sum())
    model.train(was_training)
    if weight == 0:
        raise LmforgeError("the validation data produced no tokens to score; give more validation text.")
    result = {"val_loss": loss_sum / weight, **{f"val_{k}": v / weight for k, v in stats.items()}}
    if nbytes:
        result["val_bpb"] = loss_sum / math.log(2) / nbytes
    return result


def check_context(model: Transformer, cfg: TrainConfig) -> None:
    """Training windows longer than the model's context would teach positions it never uses: refuse them."""
    limit = model.config.max_position_embeddings
    if cfg.seq_len > limit:
        raise LmforgeError(
            f"seq_len {cfg.seq_len} exceeds the model's context of {limit} tokens (max_position_embeddings); "
            f"lower --seq-len or use a model with a longer context."
        )


def resolve_precision(cfg: TrainConfig, device: str | torch.device = "cpu", announce: bool = False) -> TrainConfig:
    """`cfg` with dtype "auto" replaced by what the precision probe chose on `device` (float32/bfloat16);
    `announce` prints the choice. An explicit bf16 that is slower than fp32 here is kept, with a warning."""
    probe = probe_precision(device)
    if cfg.dtype == "auto":
        cfg = dataclasses.replace(cfg, dtype=training_dtype("auto", device))
        if announce:
            print(f"precision: {probe.describe()}", flush=True)
    elif cfg.dtype == "bfloat16" and 0 < probe.bfloat16_flops < probe.float32_flops:
        warn(
            f"bfloat16 was asked for, but bf16 matmuls run {probe.float32_flops / probe.bfloat16_flops:.0f}x slower "
            "than float32 on this machine; --dtype auto would train in float32."
        )
    return cfg


def train(
    model: Transformer,
    batches: Any,
    cfg: TrainConfig,
    run_dir: Path,
    *,
    objective: Objective = causal_lm,
    val_batches: Callable[[], Iterator[dict[str, torch.Tensor]]] | None = None,
    token_bytes: torch.Tensor | None = None,
    tokenizer_dir: Path | None = None,
    resume_from: Path | None = None,
    progress: bool = True,
    extra_state: dict[str, Any] | None = None,
    save_model: Callable[[Transformer, Path], Any] | None = None,
    parallel: ParallelConfig | None = None,
) -> TrainResult:
    """Train `model` in place on `batches` (an iterator with state_dict/load_state_dict for exact resume).

    run_dir receives metrics.jsonl and checkpoints/; `resume_from` is a checkpoint whose weights the model
    already holds: the optimizer, data position, RNG and step counters are restored from it.

    Under torchrun (a process group joined with lmforge.runtime.init_distributed), `parallel` says how
    the model is split (lmforge.parallel.parallelize, applied once here, before the optimizer is built) and
    each data-parallel rank reads its share of every global batch (RankShare); only rank 0 logs and writes.
    """
    parallel = parallel or ParallelConfig()
    if cfg.activation_checkpointing and parallel.checkpointing == "none":
        parallel = dataclasses.replace(parallel, checkpointing="full")
    rank0 = is_rank0()
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
    tune_allocator()
    torch.manual_seed(cfg.seed)
    device = model_device(model)
    cfg = resolve_precision(cfg, device, announce=progress)  # callers usually resolved it already
    autocast_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else None
    model.train()
    mesh = build_mesh(parallel, world_size(), device.type) if dist.is_initialized() else None
    if mesh is None and parallel.parallel != "none":
        raise LmforgeError(
            f"--parallel {parallel.parallel} needs several processes: launch with torchrun --nproc-per-node N."
        )
    if save_model is not None and mesh is not None and parallel.parallel != "ddp":
        raise LmforgeError(
            f"LoRA runs train under --parallel ddp (or in one process); --parallel {parallel.parallel} shards the "
            "frozen base, which adapter checkpoints do not support yet."
        )
    step_model = parallelize(model, parallel, mesh, compile=cfg.compile, dtype=cfg.dtype)
    dp_index, dp_degree = dp_coords(mesh)
    if dp_degree > 1:
        batches = RankShare(batches, dp_index, dp_degree)
    optimizer = build_optimizer(
        model,
        cfg.lr,
        cfg.weight_decay,
        (cfg.beta1, cfg.beta2),
        cfg.eps,
        cfg.decay_embeddings,
        cfg.optimizer,
        cfg.muon_momentum,
    )
    start_step, tokens_seen, skipped, elapsed_before = 0, 0, 0, 0.0
    if resume_from is not None:
        state = load_trainer_state(resume_from)
        if has_sharded(resume_from):  # written by a sharded run: any decomposition reads it back
            load_sharded(resume_from, step_model, optimizer)
        elif mesh is not None:  # a one-process checkpoint resumed under torchrun
            load_plain_optimizer(model, optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
        if hasattr(batches, "load_state_dict"):
            batches.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        start_step, tokens_seen = state["step"], state["tokens"]
        skipped, elapsed_before = state["skipped_steps"], state["elapsed_s"]
    params = [p for p in model.parameters() if p.requires_grad]

    flops_per_token = training_flops_per_token(model.config, cfg.seq_len)
    peak = matmul_peak_flops(autocast_dtype or torch.float32, device=str(device))  # MFU in the dtype used
    # A resumed run's log is cut back to the checkpoint's step: the steps after it are logged again below.
    metrics = MetricsLog(run_dir / "metrics.jsonl", start_step if resume_from is not None else None) if rank0 else None
    history: list[dict[str, Any]] = []
    budget_s = cfg.max_minutes * 60 if cfg.max_minutes else None
    warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))
    t_start = time.perf_counter() - elapsed_before
    last_loss, bad_in_a_row, step = float("nan"), 0, start_step
    val: dict[str, float] = {}
    interrupted = False

    def log(record: dict[str, Any]) -> None:
        history.append(record)
        if metrics is not None:
            metrics.write(record)

    def checkpoint(at_step: int) -> Path:
        state = {
            "step": at_step,
            "tokens": tokens_seen,
            "skipped_steps": skipped,
            "elapsed_s": time.perf_counter() - t_start,
            "optimizer": optimizer.state_dict() if mesh is None else None,  # sharded runs: in the DCP shards
            "loader": batches.state_dict() if hasattr(batches, "state_dict") else {},
            "rng": rng_state(),
            "train_config": cfg.to_dict(),
            **(extra_state or {}),
        }
        if mesh is not None:
            if metrics is not None:
                metrics.sync()
            return save_distributed(
                run_dir, at_step, model, step_model, optimizer, state, tokenizer_dir, cfg.keep_last, save_model
            )
        metrics.sync()  # on disk before the checkpoint that covers these steps is committed
        if save_model is None:
            return save_checkpoint(run_dir, at_step, model, state, tokenizer_dir, cfg.keep_last)
        return save_checkpoint(run_dir, at_step, model, state, tokenizer_dir, cfg.keep_last, save_model)

    evaluated_at = -1

    def run_eval(at_step: int) -> None:
        nonlocal val, evaluated_at
        if val_batches is None or at_step == evaluated_at:  # one validation record per step
            return
        val = evaluate(model, val_batches(), objective, token_bytes, cfg.eval_batches, autocast_dtype)
        log({"step": at_step, **val})
        evaluated_at = at_step

    bar = Progress(cfg.steps if budget_s is None else None, "train", unit="step", enabled=progress and rank0)
    bar.done = start_step
    ckpt_path: Path | None = None
    with _StopFlag() as stop, bar:
        while step < cfg.steps:
            elapsed = time.perf_counter() - t_start
            if budget_s is not None and elapsed >= budget_s:
                break
            progress_frac = (step - warmup) / max(cfg.steps - warmup, 1)
            if budget_s is not None:
                progress_frac = max(progress_frac, elapsed / budget_s)
            lr = cfg.lr * lr_multiplier(step, progress_frac, warmup, cfg.schedule, cfg.min_lr_ratio, cfg.decay_fraction)
            for group in optimizer.param_groups:
                group["lr"] = lr

            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(cfg.grad_accum)]
            with loss_context(parallel):  # loss parallel: the loss and its backward see sharded logits
                result = forward_backward(step_model, micro, objective, autocast_dtype, device, mesh)
            loss, stats, step_tokens = result.loss, result.stats, result.tokens * dp_degree
            grad_norm, stepped = optimizer_step(optimizer, params, cfg.grad_clip, loss)
            if stepped:
                bad_in_a_row = 0
                last_loss = loss
            else:
                skipped += 1
                bad_in_a_row += 1
                if bad_in_a_row >= cfg.max_bad_steps:
                    raise LmforgeError(
                        f"training diverged: {bad_in_a_row} steps in a row with a non-finite loss or gradient "
                        f"(at step {step}); lower --lr, raise --warmup-steps or train in float32."
                    )
            step += 1
            tokens_seen += step_tokens
            dt = time.perf_counter() - t0
            tps = step_tokens / dt if dt > 0 else 0.0
            record = {
                "step": step,
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": tps,
                "mfu": tps * flops_per_token / peak,
                "tokens": tokens_seen,
                "elapsed_s": time.perf_counter() - t_start,
                "skipped": not math.isfinite(loss + grad_norm),
                **stats,
            }
            log(record)
            if budget_s is not None:  # the run ends on time: show the steps the budget will allow
                bar.total = max(step, min(cfg.steps, round(step * budget_s / max(record["elapsed_s"], 1e-9))))
            bar.update(
                1,
                loss=loss,
                lr=f"{lr:.2e}",
                gnorm=round(grad_norm, 3),
                tok_s=int(tps),
                mfu=f"{record['mfu']:.1%}",
                **({"val_bpb": round(val["val_bpb"], 3)} if "val_bpb" in val else {}),
            )

            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                run_eval(step)
            if stop.stop:
                interrupted = True
                break
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                ckpt_path = checkpoint(step)
        if step > start_step or resume_from is None:
            run_eval(step)
            ckpt_path = checkpoint(step)
        else:  # resumed at its end (or out of time): nothing new to evaluate, log or save
            ckpt_path = resume_from
    if metrics is not None:
        metrics.close()
    return TrainResult(
        steps=step,
        tokens=tokens_seen,
        elapsed_s=time.perf_counter() - t_start,
        final_loss=last_loss,
        val_loss=val.get("val_loss"),
        val_bpb=val.get("val_bpb"),
        skipped_steps=skipped,
        interrupted=interrupted,
        checkpoint=ckpt_path,
        history=history,
    )
