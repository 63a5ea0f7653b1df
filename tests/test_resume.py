"""Resuming runs: every training command continues bit for bit, a damaged latest checkpoint falls back to
the newest intact one, a new run never lands on an old one, and metrics.jsonl holds every step once."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import randomize_
from safetensors.torch import load_file

import lmforge
from lmforge import LmforgeError, ModelConfig, Transformer
from lmforge.data import PackedLoader, prepare
from lmforge.finetune.config import DistillConfig, DPOConfig, SFTConfig
from lmforge.finetune.distill import distill
from lmforge.finetune.dpo import PairLoader, dpo
from lmforge.finetune.lora import LoraConfig
from lmforge.finetune.sft import finetune
from lmforge.finetune.sft_data import SFTLoader
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoints import (
    MANIFEST,
    STATE_FILE,
    checkpoint_damage,
    checkpoint_to_resume,
    resolve_model_dir,
)
from lmforge.train.config import TrainConfig
from lmforge.train.metrics import cut_back
from lmforge.train.pretrain import pretrain

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "while",
    "the",
    "dog",
    "ran",
    "to",
    "the",
    "red",
    "door",
    "and",
    "back",
    "again",
]
TEXTS = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(30 + i % 7)) + "." for i in range(40)]
TINY = {
    "vocab_size": 300,
    "hidden_size": 48,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 96,
    "tie_embeddings": True,
    "max_position_embeddings": 128,
    "family": "llama",
}


def cfg(**kw) -> TrainConfig:
    base = dict(
        steps=10,
        batch_size=2,
        seq_len=32,
        lr=3e-3,
        warmup_steps=2,
        eval_every=4,
        eval_batches=1,
        save_every=3,
        keep_last=2,
        dtype="float32",
    )
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TEXTS, 300, "llama3", min_frequency=1)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tok) -> dict[str, Path]:
    """A chat model (with its tokenizer), SFT and preference data, and shards in its tokenizer."""
    root = tmp_path_factory.mktemp("resume")
    config = ModelConfig.from_dict(TINY).replace(
        vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tuple(tok.stop_token_ids)
    )
    with torch.no_grad():
        model = randomize_(Transformer(config), std=0.05)
    lmforge.save_pretrained(model, root / "base")
    tok.save(root / "base")
    chats = [
        {"messages": [{"role": "user", "content": f"where is the {w}?"}, {"role": "assistant", "content": t[:60]}]}
        for w, t in zip(WORDS * 2, TEXTS, strict=False)
    ]
    (root / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    prefs = [
        {"prompt": f"the {w}", "chosen": t[:40], "rejected": t[::-1][:40]} for w, t in zip(WORDS, TEXTS, strict=False)
    ]
    (root / "prefs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prefs))
    for i, text in enumerate(TEXTS):
        (root / f"doc{i:02d}.txt").write_text(text)
    prepare([str(root / "doc*.txt")], tok, root / "data", val_fraction=0.1, seed=0, progress=False)
    (root / "tiny.json").write_text(json.dumps(TINY))
    return {
        "base": root / "base",
        "chats": root / "chats.jsonl",
        "prefs": root / "prefs.jsonl",
        "data": root / "data",
        "config": root / "tiny.json",
    }


def loss_records(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def latest_tensors(run_dir: Path, name: str) -> dict[str, torch.Tensor]:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(run_dir / "checkpoints" / latest / name)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def interrupted(monkeypatch, loader_cls, at_batch: int, run):
    """Run `run()` with a real SIGINT sent while it fetches batch `at_batch`: the loop finishes that step,
    saves and returns."""
    real = loader_cls.__next__
    calls = {"n": 0}

    def next_with_interrupt(self):
        calls["n"] += 1
        if calls["n"] == at_batch:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self)

    monkeypatch.setattr(loader_cls, "__next__", next_with_interrupt)
    try:
        return run()
    finally:
        monkeypatch.setattr(loader_cls, "__next__", real)


def check_exact_resume(tmp_path, monkeypatch, loader_cls, weights: str, run) -> None:
    """`run(run_dir, resume)`: 10 steps straight vs stopped by SIGINT midway and resumed to 10."""
    straight = run(tmp_path / "straight", False)
    assert straight.result.steps == 10
    first = interrupted(monkeypatch, loader_cls, 5, lambda: run(tmp_path / "resumed", False))
    assert first.result.interrupted and 1 < first.result.steps < 10
    second = run(tmp_path / "resumed", True)
    assert second.result.steps == 10
    expected = loss_records(tmp_path / "straight")
    assert [s for s, _ in expected] == list(range(1, 11))
    assert loss_records(tmp_path / "resumed") == expected  # bit for bit, every step once
    assert_same(latest_tensors(tmp_path / "straight", weights), latest_tensors(tmp_path / "resumed", weights))


# --- every command resumes exactly -------------------------------------------------------------------
def test_finetune_full_resumes_exactly(tmp_path, monkeypatch, files):
    def run(out, resume):
        return finetune(
            files["base"], files["chats"], out, cfg(), SFTConfig(val_fraction=0.1), resume=resume, progress=False
        )

    check_exact_resume(tmp_path, monkeypatch, SFTLoader, "model.safetensors", run)


def test_finetune_lora_with_dropout_resumes_exactly(tmp_path, monkeypatch, files):
    lora = LoraConfig(r=4, alpha=8, dropout=0.2, targets=("q", "v", "down"))  # dropout draws from the RNG

    def run(out, resume):
        sft = SFTConfig(method="lora", val_fraction=0.1)
        return finetune(files["base"], files["chats"], out, cfg(lr=1e-2), sft, lora, resume=resume, progress=False)

    check_exact_resume(tmp_path, monkeypatch, SFTLoader, "adapter_model.safetensors", run)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_dpo_resumes_exactly(tmp_path, monkeypatch, files, method):
    lora = LoraConfig(r=4, alpha=8, dropout=0.1) if method == "lora" else None
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"

    def run(out, resume):
        options = DPOConfig(method=method, beta=0.5, val_fraction=0.2)
        return dpo(files["base"], files["prefs"], out, cfg(lr=1e-2), options, lora, resume=resume, progress=False)

    check_exact_resume(tmp_path, monkeypatch, PairLoader, weights, run)


def test_distill_resumes_exactly(tmp_path, monkeypatch, files):
    def run(out, resume):
        return distill(
            files["base"],
            str(files["config"]),
            files["data"],
            out,
            cfg(),
            DistillConfig(),
            resume=resume,
            progress=False,
        )

    check_exact_resume(tmp_path, monkeypatch, PackedLoader, "model.safetensors", run)


# --- a damaged latest checkpoint ---------------------------------------------------------------------
def _truncate_weights(ckpt: Path) -> None:
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _scramble_state(ckpt: Path) -> None:  # same size, so only loading it tells
    f = ckpt / STATE_FILE
    f.write_bytes(bytes(b ^ 0x5A for b in f.read_bytes()))


DAMAGE = {
    "truncated weights": (_truncate_weights, "model.safetensors has"),
    "no manifest and no state": (
        lambda ckpt: [(ckpt / MANIFEST).unlink(), (ckpt / STATE_FILE).unlink()],
        f"no {MANIFEST} and no {STATE_FILE}",
    ),
    "trainer state that does not load": (_scramble_state, f"{STATE_FILE} does not load"),
    "missing directory": (lambda ckpt: __import__("shutil").rmtree(ckpt), "missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_falls_back_to_newest_intact(tmp_path, files, capsys, damage):
    settings = cfg(steps=12, save_every=4, keep_last=3, eval_every=0)
    pretrain(str(files["config"]), files["data"], tmp_path / "straight", settings, progress=False)
    first = pretrain(str(files["config"]), files["data"], tmp_path / "run", settings, progress=False)
    assert first.result.steps == 12
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000004", "step-00000008", "step-00000012"]
    damage_fn, reason = DAMAGE[damage]
    damage_fn(root / "step-00000012")
    assert reason in checkpoint_damage(root / "step-00000012")
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 13, "loss": 1.0}\n{"step": 14, "lo')  # what a killed later run could leave
    capsys.readouterr()

    ckpt = checkpoint_to_resume(tmp_path / "run", resume=True)
    assert ckpt == root / "step-00000008"
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "step-00000012" in warning[0] and "step-00000008" in warning[0], warning
    assert reason in warning[0]

    again = pretrain(str(files["config"]), files["data"], tmp_path / "run", settings, resume=True, progress=False)
    assert again.result.steps == 12
    assert loss_records(tmp_path / "run") == loss_records(tmp_path / "straight")
    assert_same(
        latest_tensors(tmp_path / "straight", "model.safetensors"),
        latest_tensors(tmp_path / "run", "model.safetensors"),
    )
    assert checkpoint_damage(root / "step-00000012") is None  # written again


def test_no_intact_checkpoint_is_an_error_with_a_remedy(tmp_path, files):
    pretrain(
        str(files["config"]), files["data"], tmp_path / "run", cfg(steps=4, save_every=2, eval_every=0), progress=False
    )
    for ckpt in (tmp_path / "run" / "checkpoints").glob("step-*"):
        (ckpt / STATE_FILE).unlink()
    with pytest.raises(LmforgeError, match="no intact checkpoint.*step-00000004.*--overwrite"):
        checkpoint_to_resume(tmp_path / "run", resume=True)


def test_checkpoints_from_before_manifests_still_resume_and_load(tmp_path, files):
    """A checkpoint written before manifests existed (its trainer state loads) is usable, not 'damaged'."""
    first, then = cfg(steps=4, save_every=4, eval_every=0), cfg(steps=8, save_every=4, eval_every=0)
    results = {}
    for name in ("with", "without"):
        pretrain(str(files["config"]), files["data"], tmp_path / name, first, progress=False)
        root = tmp_path / name / "checkpoints"
        if name == "without":
            (root / "step-00000004" / MANIFEST).unlink()
            assert checkpoint_damage(root / "step-00000004") is None
            assert lmforge.load_pretrained(resolve_model_dir(tmp_path / name)) is not None
        results[name] = pretrain(
            str(files["config"]), files["data"], tmp_path / name, then, resume=True, progress=False
        )
    assert results["without"].result.steps == 8
    assert loss_records(tmp_path / "without") == loss_records(tmp_path / "with")


def test_overwrite_never_deletes_what_the_run_reads(tmp_path, files):
    out = tmp_path / "run"
    pretrain(str(files["config"]), files["data"], out, cfg(steps=2, save_every=2, eval_every=0), progress=False)
    inside = out / "checkpoints" / "step-00000002"
    with pytest.raises(LmforgeError, match="lies inside the run.*--overwrite would delete"):
        pretrain(str(inside), files["data"], out, cfg(steps=2, eval_every=0), overwrite=True, progress=False)
    assert inside.is_dir()


# --- new runs and old ones ---------------------------------------------------------------------------
def test_new_run_needs_overwrite_which_removes_only_the_run(tmp_path, files):
    out = tmp_path / "run"
    pretrain(str(files["config"]), files["data"], out, cfg(steps=6, eval_every=0), progress=False)
    (out / "notes.txt").write_text("mine")
    (out / "subdir").mkdir()
    with pytest.raises(LmforgeError, match="already holds a run.*--resume.*--overwrite"):
        pretrain(str(files["config"]), files["data"], out, cfg(steps=4, eval_every=0), progress=False)
    with pytest.raises(LmforgeError, match="--resume.*--overwrite"):
        pretrain(str(files["config"]), files["data"], out, cfg(steps=4), resume=True, overwrite=True, progress=False)
    pretrain(
        str(files["config"]),
        files["data"],
        out,
        cfg(steps=4, save_every=2, eval_every=0),
        overwrite=True,
        progress=False,
    )
    assert [s for s, _ in loss_records(out)] == [1, 2, 3, 4]  # only the new run's steps
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-00000002", "step-00000004"]
    assert (out / "notes.txt").read_text() == "mine" and (out / "subdir").is_dir()


def test_run_that_died_before_its_first_save(tmp_path, files):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("{}")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    with pytest.raises(LmforgeError, match="before its first save.*--overwrite"):
        checkpoint_to_resume(out, resume=True)
    with pytest.raises(LmforgeError, match="already holds a run"):
        checkpoint_to_resume(out, resume=False)
    assert checkpoint_to_resume(out, resume=False, overwrite=True) is None
    assert list(out.iterdir()) == []
    with pytest.raises(LmforgeError, match="no checkpoint to resume from; drop --resume"):
        checkpoint_to_resume(tmp_path / "nothing", resume=True)


def test_resuming_a_finished_run_adds_nothing(tmp_path, files):
    out = tmp_path / "run"
    settings = cfg(steps=6, save_every=3, eval_every=3)
    pretrain(str(files["config"]), files["data"], out, settings, progress=False)
    before = (out / "metrics.jsonl").read_text()
    again = pretrain(str(files["config"]), files["data"], out, settings, resume=True, progress=False)
    assert again.result.steps == 6 and again.result.checkpoint == out / "checkpoints" / "step-00000006"
    assert (out / "metrics.jsonl").read_text() == before


# --- metrics.jsonl -----------------------------------------------------------------------------------
def test_cut_back_keeps_steps_up_to_the_checkpoint_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "loss": float(s)} for s in range(1, 7)] + [{"step": 4, "val_loss": 1.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 7, "loss": 0.')
    assert cut_back(path, 4) == 3  # steps 5, 6 and the torn line; a validation record at step 4 stays
    kept = [json.loads(x) for x in path.read_text().splitlines()]
    assert kept == [r for r in lines if r["step"] <= 4]
    assert path.read_text().endswith("\n")
    assert cut_back(path, 4) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_cli_overwrite_and_resume_flags(tmp_path, files, capsys):
    from lmforge.cli import main

    out = tmp_path / "run"
    args = ["pretrain", "--model", str(files["config"]), "--data", str(files["data"]), "--out", str(out)]
    args += ["--steps", "3", "--batch-size", "2", "--seq-len", "16", "--save-every", "0", "--eval-every", "0"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert main([*args, "--resume", "--overwrite"]) == 2
    assert main([*args, "--overwrite"]) == 0
    assert main([*args, "--resume", "--steps", "5"]) == 0
    assert [s for s, _ in loss_records(out)] == [1, 2, 3, 4, 5]
