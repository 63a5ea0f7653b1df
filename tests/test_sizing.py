"""The quickstart's sizing rule (lmforge.train.sizing) and its yardsticks: held-out bits per byte in
overlapping windows, and xz with the training text as context."""

from __future__ import annotations

import dataclasses
import lzma
import math

import numpy as np
import pytest
import torch

from lmforge import LmforgeError, ModelConfig
from lmforge.data import prepare
from lmforge.data.shards import TokenShards
from lmforge.info import count_parameters
from lmforge.quickstart import (
    BackgroundXzContext,
    QuickstartOptions,
    heldout_bpb,
    model_config,
    plan_for,
    training_tail,
    xz_context_bpb,
)
from lmforge.tokenizer import Tokenizer
from lmforge.train.perf import training_flops_per_token
from lmforge.train.sizing import (
    AVX2_REFERENCE_FLOPS,
    LADDER,
    MIN_TOKENS_PER_PARAM,
    QuickstartPlan,
    plan_from_rates,
    plan_quickstart,
    predicted_tokens_per_s,
)

BF16_FAST_FLOPS = 650e9  # an AVX-512 BF16 machine's bf16 matmul peak (REFERENCE.md section 5)


# --- the sizing rule -----------------------------------------------------------------------------------
def test_plan_grows_with_compute_and_fills_the_budget():
    plans = [plan_quickstart(f, 4.5, "float32") for f in (20e9, AVX2_REFERENCE_FLOPS, 200e9, 800e9, 5e12)]
    sizes = [p.params for p in plans]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]  # more compute never buys a smaller model
    for p in plans:
        steps = p.tokens / (p.batch_size * p.seq_len)
        assert p.tokens == pytest.approx(p.tokens_per_s * 4.5 * 60, rel=1e-6)
        assert steps > 10 * p.warmup_steps  # warmup is a small share of the run
        assert p.optimizer == "muon"


def test_predicted_throughput_follows_the_measured_rate():
    rung = LADDER[0]
    slow = predicted_tokens_per_s(rung, 50e9, "float32", 128)
    assert predicted_tokens_per_s(rung, 100e9, "float32", 128) == pytest.approx(2 * slow)
    # The calibration point: the AVX2 machine trained the old quickstart model at ~5,200 tokens/s.
    old = dataclasses.replace(rung, hidden_size=128, num_layers=4, num_heads=2, num_kv_heads=1, intermediate_size=384)
    old = dataclasses.replace(old, vocab_size=4096)
    config = ModelConfig(
        vocab_size=4096, hidden_size=128, num_layers=4, num_heads=2, num_kv_heads=1, intermediate_size=384
    )
    tps = predicted_tokens_per_s(old, AVX2_REFERENCE_FLOPS, "float32", 128)
    assert 0.4 < tps * training_flops_per_token(config, 128) / AVX2_REFERENCE_FLOPS < 0.7  # MFU 40-70%
    assert 4000 < tps < 7000


def test_plan_uses_the_budget_and_dtype():
    short = plan_quickstart(AVX2_REFERENCE_FLOPS, 1.0, "float32")
    long = plan_quickstart(AVX2_REFERENCE_FLOPS, 20, "float32")
    assert short.params <= long.params
    # bf16 autocast reaches a smaller share of its (higher) peak than fp32 does of its own.
    assert predicted_tokens_per_s(LADDER[0], 100e9, "bfloat16", 128) < predicted_tokens_per_s(
        LADDER[0], 100e9, "float32", 128
    )
    with pytest.raises(LmforgeError, match="dtype"):
        plan_quickstart(1e11, 4.5, "float16")
    with pytest.raises(LmforgeError, match="positive"):
        plan_quickstart(1e11, 0, "float32")


def test_plan_for_keeps_what_the_user_set():
    opts = QuickstartOptions(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, lr=1e-3)
    plan = plan_for(opts, AVX2_REFERENCE_FLOPS, "float32")
    auto = plan_quickstart(AVX2_REFERENCE_FLOPS, opts.minutes, "float32")
    assert (plan.hidden_size, plan.num_layers, plan.num_heads, plan.intermediate_size, plan.lr) == (64, 2, 4, 128, 1e-3)
    assert (plan.seq_len, plan.batch_size, plan.optimizer) == (auto.seq_len, auto.batch_size, auto.optimizer)
    adamw = plan_for(QuickstartOptions(optimizer="adamw", hidden_size=64), AVX2_REFERENCE_FLOPS, "float32")
    assert adamw.optimizer == "adamw" and adamw.lr == auto.lr  # an AdamW run keeps the plan's lr unless given


def test_measured_rates_pick_the_largest_rung_with_enough_tokens_and_stop_measuring_there():
    asked = []

    def rate(rung):  # a machine where each rung is as fast as its FLOPs say, at 40 GFLOP/s
        asked.append(rung)
        return 40e9 / training_flops_per_token(rung.config(), 128)

    tokens = [rate(r) * 270 for r in LADDER]
    asked.clear()
    plan = plan_from_rates(rate, 4.5)
    enough = [t >= MIN_TOKENS_PER_PARAM * count_parameters(r.config())[0] for r, t in zip(LADDER, tokens, strict=True)]
    best = max(i for i, ok in enumerate(enough) if ok or i == 0)
    assert plan.hidden_size == LADDER[best].hidden_size
    assert plan.tokens == pytest.approx(tokens[best], rel=1e-6)
    # Measured only up to the first rung that falls short (each costs more than the one before).
    assert len(asked) == min(best + 2, len(LADDER))
    fast = plan_from_rates(lambda r: 1e9, 4.5)  # a machine so fast that every rung qualifies
    assert fast.hidden_size == LADDER[-1].hidden_size


def test_model_config_is_the_plans_shape():
    plan = plan_quickstart(BF16_FAST_FLOPS, 4.5, "bfloat16")
    config = model_config(plan)
    assert (config.hidden_size, config.num_layers, config.intermediate_size) == (
        plan.hidden_size,
        plan.num_layers,
        plan.intermediate_size,
    )
    assert config.vocab_size == plan.vocab_size and config.family == "llama" and config.tie_embeddings
    assert isinstance(plan, QuickstartPlan)


# --- held-out bits per byte in overlapping windows ---------------------------------------------------------
class Unigram(torch.nn.Module):
    """Logits that ignore the context: any windowing must then give the same total, token by token."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(torch.randn(vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(*ids.shape, -1)


class LastToken(torch.nn.Module):
    """Logits from the previous token and the position: scores differ with the window's start."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g))
        self.pos = torch.nn.Parameter(torch.randn(4096, 1, generator=g))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids] * self.pos[: ids.shape[1]].sigmoid()


@pytest.fixture(scope="module")
def val_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("qs")
    texts = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * (3 + i % 5) for i in range(60)]
    for i, t in enumerate(texts):
        (root / f"m{i:02d}.py").write_text(t)
    tok = Tokenizer.train(texts, 300, "llama3", min_frequency=1)
    prepare([str(root / "*.py")], tok, root / "data", val_fraction=0.3, seed=0, progress=False)
    return root / "data", tok


def test_every_validation_token_is_scored_once(val_data):
    data, tok = val_data
    val = TokenShards(data, "val")
    ids = val.read(0, val.num_tokens).astype(np.int64)
    model = Unigram(tok.vocab_size)
    logp = torch.log_softmax(model.logits.detach(), -1).numpy()
    nbytes = np.asarray(tok.token_bytes())[ids[1:]].sum()
    direct = -logp[ids[1:]].sum() / math.log(2) / nbytes
    for seq_len in (7, 32, 64, 10_000):  # windows shorter than, and longer than, the split
        bpb, nats = heldout_bpb(model, val, data / "tokenizer", seq_len, "float32", batch_size=5)
        assert bpb == pytest.approx(direct, rel=1e-6)
        assert nats == pytest.approx(-logp[ids[1:]].mean(), rel=1e-6)


def test_overlapping_windows_score_the_late_part_of_each_window(val_data):
    data, tok = val_data
    val = TokenShards(data, "val")
    ids = torch.from_numpy(val.read(0, val.num_tokens).astype(np.int64))
    model = LastToken(tok.vocab_size)
    seq_len, n = 16, ids.numel()
    # By hand: window starts 0, 8, 16, ...; the first scores positions 0..15, the others their last 8.
    total, count, scored_to = 0.0, 0, 0
    starts = list(range(0, n - 1 - seq_len + 1, seq_len // 2))
    if starts[-1] + seq_len < n - 1:
        starts.append(n - 1 - seq_len)
    for s in starts:
        w = ids[s : s + seq_len + 1]
        with torch.no_grad():
            nll = -torch.log_softmax(model(w[None, :-1])[0], -1).gather(-1, w[1:, None])[:, 0]
        first = max(scored_to - s, 0)
        total += float(nll[first:].sum())
        count += seq_len - first
        scored_to = s + seq_len
    assert count == n - 1
    _, nats = heldout_bpb(model, val, data / "tokenizer", seq_len, "float32", batch_size=3)
    assert nats == pytest.approx(total / count, rel=1e-5)
    with torch.no_grad():
        plain = -torch.log_softmax(model(ids[None, :-1])[0], -1).gather(-1, ids[1:, None]).mean()
    assert abs(nats - float(plain)) > 1e-4  # the windows matter for this model: the test would see a slip


# --- xz with the training text as context ------------------------------------------------------------------
def test_xz_context_is_the_extra_size_of_the_text():
    context = b"".join(f"def handler_{i}(request):\n    return respond(request, {i})\n".encode() for i in range(400))
    text = b"def handler_7(request):\n    return respond(request, 7)\n" * 3
    size = lambda b: len(lzma.compress(b, preset=9 | lzma.PRESET_EXTREME))  # noqa: E731
    expected = (size(context + text) - size(context)) * 8 / len(text)
    assert xz_context_bpb(context, text) == pytest.approx(expected)
    assert xz_context_bpb(context, text) < size(text) * 8 / len(text)  # the context helps
    assert BackgroundXzContext(context, text).result() == pytest.approx(expected)


def test_training_tail_is_the_end_of_the_training_text(val_data):
    data, tok = val_data
    train = TokenShards(data, "train")
    ids = train.read(0, train.num_tokens)
    docs = np.split(ids, np.flatnonzero(ids == train.eos_token_id) + 1)
    full = "\n".join(tok.decode(d[d != train.eos_token_id].tolist()) for d in docs if d.size).encode()
    assert training_tail(data, tok, max_bytes=500) == full[-500:]
    assert training_tail(data, tok, max_bytes=10**9) == full  # a small corpus: all of it
