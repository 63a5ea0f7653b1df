"""The one training run, shared by pretraining and every fine-tuning objective, split as torchtitan's trainer
is: set up once (model passes, optimizer, resume), then per step the forward/backward over the step's
micro-batches and the optimizer step (lmforge/train/step.py), and around them the schedule, logging,
evaluation and checkpoints (this file).

A step whose loss or gradient is not finite is skipped and counted. Every step is logged to
metrics.jsonl; evaluation and checkpoints follow a schedule; Ctrl-C / SIGTERM finishes the step, saves and
returns. Under torchrun only rank 0 logs and writes files other than its checkpoint shard.
"""

from __future__ import annotations

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
from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.parallel.dcp import has_sharded, load_plain_optimizer, load_sharded
from lmforge.parallel.mesh import ParallelConfig, build_mesh
from lmforge.parallel.parallelize import parallelize
from lmforge.parallel.step import dp_coords, loss_context
from lmforge.progress import Progress
from lmforge.runtime import is_rank0, model_device, world_size
from lmforge.train.checkpoints import load_trainer_state, rng_state, save_checkpoint, save_distributed, set_rng_state
from lmforge.train.config import TrainConfig, resolve_precision
from lmforge.train.evaluate import evaluate
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


@dataclass
class Validation:
    """Held-out data for evaluation during the run: a fresh iterator per evaluation, and each token's
    byte length (for bits per byte) when known."""

    batches: Callable[[], Iterator[dict[str, torch.Tensor]]]
    token_bytes: torch.Tensor | None = None


@dataclass
class Saving:
    """What a checkpoint holds besides the weights and the trainer state: the tokenizer to copy, extra
    entries for the trainer state, and a writer for the model when it is not the whole model (LoRA)."""

    tokenizer_dir: Path | None = None
    extra_state: dict[str, Any] = field(default_factory=dict)
    save_model: Callable[[Transformer, Path], Any] | None = None


class Trainer:
    """One training run of `model` on `batches` (an iterator; with state_dict/load_state_dict for exact resume).

    Construction does the one-time work in a fixed order: the model passes (lmforge.parallel.parallelize:
    TP -> activation checkpointing -> compile -> FSDP/DDP), each data-parallel rank's share of the global
    batch order (RankShare), the optimizer over the passes' parameters, and the restore of a checkpoint's
    optimizer, data position, RNG and counters. `step()` runs one optimizer step; `run()` the whole
    schedule with evaluation, checkpoints and a clean stop."""

    def __init__(
        self,
        model: Transformer,
        batches: Any,
        cfg: TrainConfig,
        run_dir: Path,
        *,
        objective: Objective = causal_lm,
        validation: Validation | None = None,
        saving: Saving | None = None,
        parallel: ParallelConfig | None = None,
        resume_from: Path | None = None,
        progress: bool = True,
    ) -> None:
        self.model, self.objective, self.run_dir = model, objective, run_dir
        self.validation, self.saving = validation, saving or Saving()
        self.parallel = parallel or ParallelConfig()
        self.resume_from, self.show_progress = resume_from, progress
        self.rank0 = is_rank0()
        if self.rank0:
            run_dir.mkdir(parents=True, exist_ok=True)
        tune_allocator()
        torch.manual_seed(cfg.seed)
        self.device = model_device(model)
        self.cfg = cfg = resolve_precision(cfg, self.device, announce=progress)  # callers usually resolved it
        self.autocast_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else None
        model.train()

        self.mesh = self._mesh()
        self.step_model = parallelize(
            model,
            self.parallel,
            self.mesh,
            compile=cfg.compile,
            dtype=cfg.dtype,
            checkpointing=cfg.activation_checkpointing,
            checkpoint_every=cfg.checkpoint_every,
        )
        self.dp_index, self.dp_degree = dp_coords(self.mesh)
        self.batches = RankShare(batches, self.dp_index, self.dp_degree) if self.dp_degree > 1 else batches
        self.optimizer = build_optimizer(
            model,
            cfg.lr,
            cfg.weight_decay,
            (cfg.beta1, cfg.beta2),
            cfg.eps,
            cfg.decay_embeddings,
            cfg.optimizer,
            cfg.muon_momentum,
        )
        self.params = [p for p in model.parameters() if p.requires_grad]

        self.step_count, self.tokens_seen, self.skipped, elapsed_before = 0, 0, 0, 0.0
        if resume_from is not None:
            elapsed_before = self._restore(resume_from)
        self.start_step = self.step_count
        self.flops_per_token = training_flops_per_token(model.config, cfg.seq_len)
        self.peak = matmul_peak_flops(self.autocast_dtype or torch.float32, device=str(self.device))  # MFU in it
        # A resumed run's log is cut back to the checkpoint's step: the steps after it are logged again.
        self.metrics = None
        if self.rank0:
            self.metrics = MetricsLog(run_dir / "metrics.jsonl", self.step_count if resume_from is not None else None)
        self.history: list[dict[str, Any]] = []
        self.budget_s = cfg.max_minutes * 60 if cfg.max_minutes else None
        self.warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))
        self.t_start = time.perf_counter() - elapsed_before
        self.last_loss, self.bad_in_a_row = float("nan"), 0
        self.val: dict[str, float] = {}
        self.evaluated_at = -1

    # --- set-up ----------------------------------------------------------------------------------------
    def _mesh(self) -> Any:
        parallel = self.parallel
        mesh = build_mesh(parallel, world_size(), self.device.type) if dist.is_initialized() else None
        if mesh is None and parallel.parallel != "none":
            raise LmforgeError(
                f"--parallel {parallel.parallel} needs several processes: launch with torchrun --nproc-per-node N."
            )
        if self.saving.save_model is not None and mesh is not None and "tp" in parallel.parallel:
            raise LmforgeError(
                f"LoRA runs train under --parallel ddp or fsdp (or in one process); --parallel {parallel.parallel} "
                "would split the adapters' rank dimension over the tensor-parallel ranks: use fsdp."
            )
        return mesh

    def _restore(self, checkpoint: Path) -> float:
        """Optimizer, data position, RNG and counters from `checkpoint` (whose weights the model already holds);
        returns the seconds the run had already trained."""
        state = load_trainer_state(checkpoint)
        if has_sharded(checkpoint):  # written by a sharded run: any decomposition reads it back
            load_sharded(checkpoint, self.step_model, self.optimizer)
        elif self.mesh is not None:  # a one-process checkpoint resumed under torchrun
            load_plain_optimizer(self.model, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        if hasattr(self.batches, "load_state_dict"):
            self.batches.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        self.step_count, self.tokens_seen, self.skipped = state["step"], state["tokens"], state["skipped_steps"]
        return state["elapsed_s"]

    # --- one step --------------------------------------------------------------------------------------
    def learning_rate(self) -> float:
        """The schedule's rate for the next step; with a time budget, the share of time spent counts too."""
        cfg = self.cfg
        progress_frac = (self.step_count - self.warmup) / max(cfg.steps - self.warmup, 1)
        if self.budget_s is not None:
            progress_frac = max(progress_frac, self.elapsed() / self.budget_s)
        return cfg.lr * lr_multiplier(
            self.step_count, progress_frac, self.warmup, cfg.schedule, cfg.min_lr_ratio, cfg.decay_fraction
        )

    def step(self) -> dict[str, Any]:
        """One optimizer step over `grad_accum` micro-batches; returns (and logs) its record."""
        cfg = self.cfg
        lr = self.learning_rate()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        micro = [next(self.batches) for _ in range(cfg.grad_accum)]
        with loss_context(self.parallel):  # loss parallel: the loss and its backward see sharded logits
            result = forward_backward(
                self.step_model, micro, self.objective, self.autocast_dtype, self.device, self.mesh
            )
        loss, step_tokens = result.loss, result.tokens * self.dp_degree
        grad_norm, stepped = optimizer_step(self.optimizer, self.params, cfg.grad_clip, loss)
        if stepped:
            self.bad_in_a_row, self.last_loss = 0, loss
        else:
            self.skipped += 1
            self.bad_in_a_row += 1
            if self.bad_in_a_row >= cfg.max_bad_steps:
                raise LmforgeError(
                    f"training diverged: {self.bad_in_a_row} steps in a row with a non-finite loss or gradient "
                    f"(at step {self.step_count}); lower --lr, raise --warmup-steps or train in float32."
                )
        self.step_count += 1
        self.tokens_seen += step_tokens
        dt = time.perf_counter() - t0
        tps = step_tokens / dt if dt > 0 else 0.0
        record = {
            "step": self.step_count,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tps,
            "mfu": tps * self.flops_per_token / self.peak,
            "tokens": self.tokens_seen,
            "elapsed_s": self.elapsed(),
            "skipped": not math.isfinite(loss + grad_norm),
            **result.stats,
        }
        self.log(record)
        return record

    # --- around the steps --------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.metrics is not None:
            self.metrics.write(record)

    def evaluate(self) -> None:
        """Validate at the current step (once per step) and log the record."""
        if self.validation is None or self.step_count == self.evaluated_at:
            return
        v = self.validation
        self.val = evaluate(
            self.model, v.batches(), self.objective, v.token_bytes, self.cfg.eval_batches, self.autocast_dtype
        )
        self.log({"step": self.step_count, **self.val})
        self.evaluated_at = self.step_count

    def checkpoint(self) -> Path:
        """Save the run at the current step: weights (or adapters), optimizer, data position, RNG, counters."""
        cfg, saving, at = self.cfg, self.saving, self.step_count
        state = {
            "step": at,
            "tokens": self.tokens_seen,
            "skipped_steps": self.skipped,
            "elapsed_s": self.elapsed(),
            "optimizer": self.optimizer.state_dict() if self.mesh is None else None,  # sharded: in the DCP shards
            "loader": self.batches.state_dict() if hasattr(self.batches, "state_dict") else {},
            "rng": rng_state(),
            "train_config": cfg.to_dict(),
            **saving.extra_state,
        }
        if self.metrics is not None:
            self.metrics.sync()  # on disk before the checkpoint that covers these steps is committed
        if self.mesh is not None:
            return save_distributed(
                self.run_dir,
                at,
                self.step_model,
                self.optimizer,
                state,
                saving.tokenizer_dir,
                cfg.keep_last,
                saving.save_model,
            )
        return save_checkpoint(
            self.run_dir, at, self.model, state, saving.tokenizer_dir, cfg.keep_last, saving.save_model
        )

    def _show(self, bar: Progress, record: dict[str, Any]) -> None:
        if self.budget_s is not None:  # the run ends on time: show the steps the budget will allow
            done = max(record["elapsed_s"], 1e-9)
            bar.total = max(self.step_count, min(self.cfg.steps, round(self.step_count * self.budget_s / done)))
        bar.update(
            1,
            loss=record["loss"],
            lr=f"{record['lr']:.2e}",
            gnorm=round(record["grad_norm"], 3),
            tok_s=int(record["tokens_per_s"]),
            mfu=f"{record['mfu']:.1%}",
            **({"val_bpb": round(self.val["val_bpb"], 3)} if "val_bpb" in self.val else {}),
        )

    def run(self) -> TrainResult:
        """Steps until `cfg.steps` (or the time budget, or a stop signal), evaluating and saving on schedule;
        the end is always evaluated and saved unless nothing new was trained."""
        cfg = self.cfg
        total = cfg.steps if self.budget_s is None else None
        bar = Progress(total, "train", unit="step", enabled=self.show_progress and self.rank0)
        bar.done = self.start_step
        interrupted, ckpt_path = False, None
        with _StopFlag() as stop, bar:
            while self.step_count < cfg.steps:
                if self.budget_s is not None and self.elapsed() >= self.budget_s:
                    break
                self._show(bar, self.step())
                step, last = self.step_count, self.step_count >= cfg.steps
                if cfg.eval_every and step % cfg.eval_every == 0 and not last:
                    self.evaluate()
                if stop.stop:
                    interrupted = True
                    break
                if cfg.save_every and step % cfg.save_every == 0 and not last:
                    ckpt_path = self.checkpoint()
            if self.step_count > self.start_step or self.resume_from is None:
                self.evaluate()
                ckpt_path = self.checkpoint()
            else:  # resumed at its end (or out of time): nothing new to evaluate, log or save
                ckpt_path = self.resume_from
        if self.metrics is not None:
            self.metrics.close()
        return TrainResult(
            steps=self.step_count,
            tokens=self.tokens_seen,
            elapsed_s=self.elapsed(),
            final_loss=self.last_loss,
            val_loss=self.val.get("val_loss"),
            val_bpb=self.val.get("val_bpb"),
            skipped_steps=self.skipped,
            interrupted=interrupted,
            checkpoint=ckpt_path,
            history=self.history,
        )


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
    """Train `model` in place on `batches` (see Trainer); the run's result.

    run_dir receives metrics.jsonl and checkpoints/; `resume_from` is a checkpoint whose weights the model
    already holds: the optimizer, data position, RNG and step counters are restored from it. Under
    torchrun (a process group joined with lmforge.runtime.init_distributed), `parallel` says how the model
    is split; each data-parallel rank reads its share of every global batch; only rank 0 logs and writes.
    """
    validation = Validation(val_batches, token_bytes) if val_batches is not None else None
    saving = Saving(tokenizer_dir, dict(extra_state or {}), save_model)
    trainer = Trainer(
        model,
        batches,
        cfg,
        run_dir,
        objective=objective,
        validation=validation,
        saving=saving,
        parallel=parallel,
        resume_from=resume_from,
        progress=progress,
    )
    return trainer.run()
