"""The quickstart's sizing rule: from this machine's measured matmul speed and the time budget to a model
shape, vocabulary, batch, learning rate and optimizer.

A fixed model cannot suit both kinds of CPU seen here (REFERENCE.md section 5): an AVX2-only machine trains
in fp32 at ~83 GFLOP/s of matmul peak, an AVX-512 BF16 one in bf16 autocast at ~600-900 GFLOP/s, about
6x the training compute in the same minutes. So the quickstart measures the peak in the dtype it will train
in and asks `plan_quickstart` for the largest rung of a small ladder of Llama-3-style shapes that still
sees enough tokens per parameter in the budget.

How it was calibrated (docs/LOG.md, 2026-12-01; benchmarks/quickstart_sweep.py reruns every number):
- Throughput: tokens/s = peak x efficiency / training FLOPs per token (lmforge.train.perf). Each rung's
  efficiency (achieved training FLOP/s over the matmul peak) was measured as the best step of interleaved
  rounds, in fp32 with torch limited to AVX2 kernels (ATEN_CPU_CAPABILITY=avx2: the AVX2 machine emulated
  on an AVX-512 one) and in bf16 autocast natively on AVX-512 BF16; fp32 efficiencies are scaled so that
  the old quickstart model reproduces the ~5,200 tokens/s measured on the real AVX2 machine (83 GFLOP/s).
- Quality: held-out bits per byte of step-bounded runs whose token counts are what each rung reaches in
  the budget on each machine (predicted tokens/s x budget), since quality at a fixed token count does not
  depend on how busy the shared machine was. The rung that won at each budget fixes MIN_TOKENS_PER_PARAM.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.info import count_parameters
from lmforge.train.perf import training_flops_per_token

AVX2_REFERENCE_FLOPS = 83e9  # fp32 1024^3 matmul peak of the AVX2-only machine (REFERENCE.md section 5)
DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class Rung:
    """One shape of the ladder and its measured efficiency (training FLOP/s over matmul peak) per dtype."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    efficiency_float32: float
    efficiency_bfloat16: float

    def config(self, vocab_size: int | None = None) -> ModelConfig:
        return ModelConfig(
            vocab_size=vocab_size or self.vocab_size,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            intermediate_size=self.intermediate_size,
            tie_embeddings=True,
            max_position_embeddings=1024,
            family="llama",
        )

    def efficiency(self, dtype: str) -> float:
        return self.efficiency_float32 if dtype == "float32" else self.efficiency_bfloat16


# Efficiencies: fp32 from the AVX2-emulated speed sweeps (scaled to the real AVX2 machine, see above), bf16
# from native AVX-512 BF16 sweeps; h64's bf16 efficiency is extrapolated from h96's (smaller matmuls reach
# a smaller share of the peak), as no bf16 run chose it.
LADDER: tuple[Rung, ...] = (
    Rung(64, 4, 1, 1, 192, 2048, 0.49, 0.16),
    Rung(96, 4, 2, 1, 256, 2048, 0.52, 0.20),
    Rung(128, 4, 2, 1, 384, 2048, 0.56, 0.24),
    Rung(192, 4, 3, 1, 512, 2048, 0.56, 0.24),
    Rung(256, 4, 4, 2, 704, 2048, 0.56, 0.24),
)
# At the AVX2 machine's 4.5 minutes, h64 (~13 tokens per parameter) beat h96 (~5) by 0.05 bits/byte on
# average over seeds and varied less (docs/LOG.md): below ~10 tokens per parameter a bigger model loses.
MIN_TOKENS_PER_PARAM = 10.0
SEQ_LEN = 128
BATCH_SIZE = 16
MUON_LR = 1e-2
WARMUP_SHARE = 0.03  # of the predicted steps


@dataclass(frozen=True)
class QuickstartPlan:
    """What the quickstart trains; `tokens_per_s` and `tokens` are the rule's predictions for the budget."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    seq_len: int
    batch_size: int
    lr: float
    optimizer: str
    warmup_steps: int = 30
    vocab_size: int = 2048
    tokens_per_s: float = 0.0
    tokens: int = 0
    params: int = 0

    def describe(self) -> str:
        return (
            f"h{self.hidden_size} x {self.num_layers} layers, vocab {self.vocab_size}, "
            f"{self.optimizer} lr {self.lr:g}, "
            f"~{self.tokens_per_s:,.0f} tokens/s -> ~{self.tokens / 1e6:.1f}M tokens"
        )


def predicted_tokens_per_s(rung: Rung, flops_per_s: float, dtype: str, seq_len: int, vocab_size: int = 0) -> float:
    """Training tokens/s of `rung` (with `vocab_size` tokens if > 0) on a machine whose matmul peak in `dtype`
    is `flops_per_s`."""
    flops_per_token = training_flops_per_token(rung.config(vocab_size or None), seq_len)
    return flops_per_s * rung.efficiency(dtype) / flops_per_token


def plan_quickstart(flops_per_s: float, minutes: float, dtype: str, vocab_size: int = 0) -> QuickstartPlan:
    """The plan for a machine whose matmul peak in `dtype` is `flops_per_s`, from the calibrated
    efficiencies (a model of a machine one does not have; the quickstart measures its own instead)."""
    if dtype not in DTYPES:
        raise LmforgeError(f"the sizing rule knows the training dtypes {', '.join(DTYPES)}, got {dtype!r}.")
    if not (flops_per_s > 0 and minutes > 0):
        raise LmforgeError(f"the matmul peak and the budget must be positive, got {flops_per_s} and {minutes}.")
    return plan_from_rates(
        lambda rung: predicted_tokens_per_s(rung, flops_per_s, dtype, SEQ_LEN, vocab_size), minutes, vocab_size
    )


def plan_from_rates(rate: Callable[[Rung], float], minutes: float, vocab_size: int = 0) -> QuickstartPlan:
    """The largest rung that sees at least MIN_TOKENS_PER_PARAM tokens per parameter in `minutes` at
    `rate(rung)` training tokens/s, trained with Muon; `vocab_size` > 0 replaces the rungs' vocabulary.
    Rungs are asked smallest first and the first that falls short ends the search (each costs more than
    the one before), so a measured `rate` is only run where it can matter."""
    if not minutes > 0:
        raise LmforgeError(f"the budget must be positive, got {minutes} minutes.")
    seconds = minutes * 60
    chosen, tps = LADDER[0], rate(LADDER[0])
    for rung in LADDER[1:]:
        r = rate(rung)
        if r * seconds < MIN_TOKENS_PER_PARAM * count_parameters(rung.config(vocab_size or None))[0]:
            break
        chosen, tps = rung, r
    vocab = vocab_size or chosen.vocab_size
    steps = tps * seconds / (BATCH_SIZE * SEQ_LEN)
    return QuickstartPlan(
        hidden_size=chosen.hidden_size,
        num_layers=chosen.num_layers,
        num_heads=chosen.num_heads,
        num_kv_heads=chosen.num_kv_heads,
        intermediate_size=chosen.intermediate_size,
        seq_len=SEQ_LEN,
        batch_size=BATCH_SIZE,
        lr=MUON_LR,
        optimizer="muon",
        warmup_steps=max(1, math.ceil(WARMUP_SHARE * steps)),
        vocab_size=vocab,
        tokens_per_s=tps,
        tokens=round(tps * seconds),
        params=count_parameters(chosen.config(vocab))[0],
    )
