"""Muon (lmforge.train.muon): orthogonalisation quality, the update rule by hand, AdamW parity for the
other parameters, parameter routing, exact resume, and training through the loop with --optimizer muon."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from lmforge import LmforgeError, ModelConfig, Transformer
from lmforge.train.config import TrainConfig
from lmforge.train.loop import train
from lmforge.train.muon import Muon, hidden_matrices, muon_param_groups, orthogonalize, update_scale
from lmforge.train.optim import build_optimizer

TINY = dict(
    vocab_size=97,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
    family="llama",
)


def tiny_model(seed: int = 0, tie: bool = True) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_dict({**TINY, "tie_embeddings": tie}))


def ill_conditioned(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """A matrix with singular values from 0.1 to 10 (log-spaced) and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=torch.float64))
    return (u * torch.logspace(1, -1, k, dtype=torch.float64)) @ v.T


# --- orthogonalisation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(48, 160), (160, 48), (64, 64)])
def test_newton_schulz_flattens_the_spectrum_and_keeps_the_singular_vectors(shape):
    g = ill_conditioned(*shape)
    o = orthogonalize(g.float()).double()
    s = torch.linalg.svdvals(o)
    # Singular values spanning two decades all come out in the quintic's band around 1 (about 0.7-1.2).
    assert s.max() < 1.25 and s.min() > 0.6
    # Same singular vectors as g: U^T O V is diagonal.
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    core = u.T @ o @ vh.T
    off = core - torch.diag(torch.diagonal(core))
    assert off.abs().max() < 1e-3 * torch.diagonal(core).abs().min().item() + 1e-4


def test_orthogonalize_batches_and_transposes_consistently():
    a, b = ill_conditioned(24, 80, seed=1).float(), ill_conditioned(24, 80, seed=2).float()
    batched = orthogonalize(torch.stack([a, b]))
    assert torch.allclose(batched[0], orthogonalize(a), atol=1e-5)
    assert torch.allclose(batched[1], orthogonalize(b), atol=1e-5)
    assert torch.allclose(orthogonalize(a.T.contiguous()), orthogonalize(a).T, atol=1e-5)


def test_update_scale_matches_adamw_rms():
    # An orthogonalised [r, c] matrix has RMS 1/sqrt(max(r, c)); the scale makes it 0.2.
    o = orthogonalize(torch.randn(32, 128))
    rms = float((o * update_scale(o.shape)).pow(2).mean().sqrt())
    assert update_scale(torch.Size([32, 128])) == pytest.approx(0.2 * math.sqrt(128))
    assert 0.15 < rms < 0.22


# --- the update rule -----------------------------------------------------------------------------------
def test_muon_step_by_hand():
    torch.manual_seed(0)
    w0 = torch.randn(8, 20)
    p = nn.Parameter(w0.clone())
    lr, mu, wd = 0.05, 0.9, 0.1
    opt = Muon([{"params": [p], "use_muon": True, "weight_decay": wd}], lr=lr, momentum=mu)
    g1, g2 = torch.randn(8, 20), torch.randn(8, 20)
    scale = 0.2 * math.sqrt(20)

    p.grad = g1.clone()
    opt.step()
    # Nesterov momentum: buffer b1 = g1; direction g1 + mu * b1; decoupled decay, then the scaled step.
    w1 = w0 * (1 - lr * wd) - lr * scale * orthogonalize(g1 + mu * g1)
    assert torch.allclose(p.detach(), w1, atol=1e-6)

    p.grad = g2.clone()
    opt.step()
    b2 = mu * g1 + g2
    w2 = w1 * (1 - lr * wd) - lr * scale * orthogonalize(g2 + mu * b2)
    assert torch.allclose(p.detach(), w2, atol=1e-6)
    assert torch.allclose(opt.state[p]["momentum_buffer"], b2, atol=1e-6)


def test_plain_momentum_and_lr_scale():
    torch.manual_seed(1)
    p = nn.Parameter(torch.randn(6, 6))
    w0 = p.detach().clone()
    opt = Muon([{"params": [p], "use_muon": True, "lr_scale": 2.0}], lr=0.01, momentum=0.5, nesterov=False)
    g1, g2 = torch.randn(6, 6), torch.randn(6, 6)
    p.grad = g1.clone()
    opt.step()
    p.grad = g2.clone()
    opt.step()
    scale = 0.2 * math.sqrt(6)
    expected = w0 - 0.02 * scale * orthogonalize(g1) - 0.02 * scale * orthogonalize(0.5 * g1 + g2)
    assert torch.allclose(p.detach(), expected, atol=1e-6)


def test_adamw_groups_match_torch_adamw():
    ref, ours = tiny_model(), tiny_model()
    groups = lambda m: [  # noqa: E731
        {"params": [m.embed.weight], "weight_decay": 0.1},
        {"params": [p for n, p in m.named_parameters() if n != "embed.weight"], "weight_decay": 0.0},
    ]
    opt_ref = torch.optim.AdamW(groups(ref), lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    opt_ours = Muon([{**g, "use_muon": False} for g in groups(ours)], lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(4):
        for model, opt in ((ref, opt_ref), (ours, opt_ours)):
            loss = model(ids).logsumexp(-1).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(ref.named_parameters(), ours.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), name


# --- which parameters get Muon ---------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [True, False])
def test_hidden_matrices_only_get_muon(tie):
    model = tiny_model(tie=tie)
    groups = muon_param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in groups if g["use_muon"] for p in g["params"]}
    adam = {names[id(p)] for g in groups if not g["use_muon"] for p in g["params"]}
    assert muon == {n for n, p in model.named_parameters() if n.startswith("layers.") and p.dim() == 2}
    assert "embed.weight" in adam and ("lm_head.weight" in adam) == (not tie)
    assert all(n.endswith("norm.weight") or n in ("embed.weight", "lm_head.weight") for n in adam)
    assert len(hidden_matrices(model)) == 7 * TINY["num_layers"]  # q, k, v, o, gate, up, down
    decay = {g["use_muon"]: g["weight_decay"] for g in groups}
    assert decay == {True: 0.1, False: 0.0}


def test_muon_refuses_vectors_and_bad_settings():
    with pytest.raises(LmforgeError, match="2-D"):
        Muon([{"params": [nn.Parameter(torch.ones(4))], "use_muon": True}], lr=0.01)
    with pytest.raises(LmforgeError, match="momentum"):
        Muon([{"params": [nn.Parameter(torch.ones(4, 4))], "use_muon": True}], lr=0.01, momentum=1.0)
    with pytest.raises(LmforgeError, match="optimizer"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(LmforgeError, match="optimizer"):
        build_optimizer(tiny_model(), 1e-3, kind="lion")
    assert isinstance(build_optimizer(tiny_model(), 1e-3), torch.optim.AdamW)  # still the default


# --- resume and the training loop ----------------------------------------------------------------------
def run_steps(model: Transformer, opt: torch.optim.Optimizer, batches: list[torch.Tensor]) -> None:
    for ids in batches:
        logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_state_dict_resumes_exactly():
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 97, (2, 17), generator=gen) for _ in range(6)]
    straight = tiny_model()
    opt = build_optimizer(straight, 0.02, kind="muon", momentum=0.9)
    run_steps(straight, opt, batches)

    first = tiny_model()
    opt = build_optimizer(first, 0.02, kind="muon", momentum=0.9)
    run_steps(first, opt, batches[:3])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # as checkpoints are read back
    resumed = tiny_model(seed=1)  # different weights: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    opt = build_optimizer(resumed, 0.02, kind="muon", momentum=0.9)
    opt.load_state_dict(saved["optimizer"])
    run_steps(resumed, opt, batches[3:])
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name


class RepeatedBatch:
    def __init__(self, ids: torch.Tensor) -> None:
        self.batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.batch


def test_training_loop_with_muon_learns(tmp_path):
    ids = torch.randint(0, 97, (4, 33), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(
        steps=30,
        batch_size=4,
        seq_len=32,
        lr=0.01,
        warmup_steps=3,
        optimizer="muon",
        dtype="float32",
        eval_every=0,
        save_every=0,
    )
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    result = train(model, RepeatedBatch(ids), cfg, tmp_path / "run", progress=False)
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert losses[-1] < 0.5 * losses[0]  # memorises the batch
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # all trained
