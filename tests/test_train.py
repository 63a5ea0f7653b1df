"""The training loop: learning, exact resume, atomic checkpoints, NaN guard, schedules, CLI and quickstart."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lmforge
from lmforge import LmforgeError, ModelConfig, Transformer
from lmforge.data import PackedLoader, prepare
from lmforge.parallel.checkpointing import apply_activation_checkpointing
from lmforge.tokenizer import Tokenizer
from lmforge.train import checkpoints as ckpt_module
from lmforge.train.checkpoints import latest_checkpoint
from lmforge.train.config import TrainConfig
from lmforge.train.loop import train
from lmforge.train.objectives import LossOutput, causal_lm
from lmforge.train.optim import lr_multiplier, param_groups
from lmforge.train.pretrain import pretrain

TINY_MODEL = {
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


def corpus_texts() -> list[str]:
    """Repetitive English-like text with structure a tiny model can learn in a few dozen steps."""
    words = [
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
    return [" ".join(words[(i + j) % len(words)] for j in range(40 + i % 7)) + "." for i in range(60)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(corpus_texts()):
        (root / f"doc{i:03d}.txt").write_text(text)
    tok = Tokenizer.train(corpus_texts(), 300, "llama3", min_frequency=1)
    out = root / "data"
    prepare([str(root / "*.txt")], tok, out, val_fraction=0.1, seed=0, progress=False)
    return out


@pytest.fixture(scope="module")
def model_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.json"
    path.write_text(json.dumps(TINY_MODEL))
    return path


def small_cfg(**kw) -> TrainConfig:
    base = dict(
        steps=12,
        batch_size=4,
        seq_len=32,
        lr=3e-3,
        warmup_steps=2,
        eval_every=6,
        eval_batches=2,
        save_every=4,
        keep_last=2,
        dtype="float32",  # exact comparisons; `auto` would pick bf16 on some machines
    )
    base.update(kw)
    return TrainConfig(**base)


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


# --- learning ------------------------------------------------------------------------------------------
def test_loss_falls_and_metrics_are_logged(tmp_path, data_dir, model_config):
    out = pretrain(str(model_config), data_dir, tmp_path / "run", small_cfg(steps=40, eval_every=20), progress=False)
    series = losses(tmp_path / "run")
    assert len(series) == 40
    assert sum(series[-5:]) / 5 < 0.6 * sum(series[:3]) / 3  # clearly learning
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step_rec = next(r for r in records if "loss" in r)
    assert {"step", "loss", "lr", "tokens_per_s", "grad_norm", "mfu"} <= set(step_rec)
    val_recs = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val_recs] == [20, 40] and val_recs[-1]["val_loss"] == out.result.val_loss
    assert val_recs[-1]["val_loss"] < val_recs[0]["val_loss"]  # the held-out loss itself fell
    # Bits per byte by hand: the mean loss times the scored tokens, over the UTF-8 bytes they decode to.
    from lmforge.data.loader import sequential_batches
    from lmforge.data.shards import TokenShards

    tok = Tokenizer.from_pretrained(data_dir / "tokenizer")
    batches = list(sequential_batches(TokenShards(data_dir, "val"), 4, 32))[:2]  # eval_batches=2
    rows = [row[row >= 0].tolist() for b in batches for row in b["labels"]]
    n_bytes = sum(len(tok.decode(row, skip_special_tokens=True).encode()) for row in rows)
    for r in val_recs:
        bpb = r["val_loss"] * sum(map(len, rows)) / n_bytes / math.log(2)
        assert r["val_bpb"] == pytest.approx(bpb, rel=1e-6)
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


def test_checkpoint_is_an_hf_directory_transformers_loads(tmp_path, data_dir, model_config):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = pretrain(str(model_config), data_dir, tmp_path / "run", small_cfg(steps=4), progress=False)
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt == out.result.checkpoint
    hf = AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="sdpa").eval()
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, out.model.eval()(ids), atol=1e-5)
    hf_tok = AutoTokenizer.from_pretrained(ckpt)
    assert hf_tok.encode("the cat", add_special_tokens=False) == Tokenizer.from_pretrained(ckpt).encode("the cat")


# --- exact resume --------------------------------------------------------------------------------------
def test_resume_is_bit_exact(tmp_path, data_dir, model_config, monkeypatch):
    cfg = small_cfg(steps=12, save_every=0, eval_every=0)
    pretrain(str(model_config), data_dir, tmp_path / "straight", cfg, progress=False)
    straight = losses(tmp_path / "straight")

    # The second run is stopped by a real SIGINT while fetching the batch of step 7: it finishes that step,
    # saves and returns; then it is resumed.
    real_next = PackedLoader.__next__
    calls = {"n": 0}

    def next_with_interrupt(self):
        calls["n"] += 1
        if calls["n"] == 7:
            os.kill(os.getpid(), signal.SIGINT)
        return real_next(self)

    monkeypatch.setattr(PackedLoader, "__next__", next_with_interrupt)
    first = pretrain(str(model_config), data_dir, tmp_path / "resumed", cfg, progress=False)
    monkeypatch.setattr(PackedLoader, "__next__", real_next)
    assert first.result.interrupted and first.result.steps == 7
    second = pretrain(str(model_config), data_dir, tmp_path / "resumed", cfg, resume=True, progress=False)
    assert second.result.steps == 12
    assert losses(tmp_path / "resumed") == straight  # bit for bit
    final_a = load_file(latest_checkpoint(tmp_path / "straight") / "model.safetensors")
    final_b = load_file(latest_checkpoint(tmp_path / "resumed") / "model.safetensors")
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_existing_run_needs_resume_and_resume_needs_a_run(tmp_path, data_dir, model_config):
    pretrain(str(model_config), data_dir, tmp_path / "run", small_cfg(steps=2), progress=False)
    with pytest.raises(LmforgeError, match="--resume"):
        pretrain(str(model_config), data_dir, tmp_path / "run", small_cfg(steps=2), progress=False)
    with pytest.raises(LmforgeError, match="no checkpoint"):
        pretrain(str(model_config), data_dir, tmp_path / "new", small_cfg(steps=2), resume=True, progress=False)


# --- checkpoints ---------------------------------------------------------------------------------------
def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, data_dir, model_config, monkeypatch):
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint dies while writing its trainer state
            raise OSError("disk full")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt_module.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        pretrain(str(model_config), data_dir, tmp_path / "run", small_cfg(steps=12, save_every=4), progress=False)
    monkeypatch.setattr(ckpt_module.torch, "save", real_save)
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt is not None and ckpt.name == "step-00000004"
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]
    model = lmforge.load_pretrained(ckpt)
    assert model(torch.tensor([[1, 2, 3]])).isfinite().all()
    resumed = pretrain(
        str(model_config), data_dir, tmp_path / "run", small_cfg(steps=12, save_every=4), resume=True, progress=False
    )
    assert resumed.result.steps == 12


def test_keeps_only_the_last_k_checkpoints(tmp_path, data_dir, model_config):
    pretrain(
        str(model_config), data_dir, tmp_path / "run", small_cfg(steps=12, save_every=2, keep_last=2), progress=False
    )
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.is_dir())
    assert names == ["step-00000010", "step-00000012"]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step-00000012"


# --- loop mechanics ------------------------------------------------------------------------------------
class FixedBatches:
    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.batch


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_dict(TINY_MODEL))


def test_non_finite_steps_are_skipped_then_training_stops(tmp_path):
    ids = torch.randint(0, 300, (2, 17))
    batches = FixedBatches({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
    calls = {"n": 0}

    def sometimes_nan(model, batch):
        calls["n"] += 1
        out = causal_lm(model, batch)
        return LossOutput(out.loss_sum * float("nan"), out.weight) if calls["n"] in (2, 3) else out

    model = tiny_model()
    result = train(
        model,
        batches,
        small_cfg(steps=5, save_every=0, eval_every=0),
        tmp_path / "a",
        objective=sometimes_nan,
        progress=False,
    )
    assert result.skipped_steps == 2 and math.isfinite(result.final_loss)
    assert all(p.isfinite().all() for p in model.parameters())

    def always_nan(model, batch):
        out = causal_lm(model, batch)
        return LossOutput(out.loss_sum * float("nan"), out.weight)

    with pytest.raises(LmforgeError, match="diverged"):
        train(
            tiny_model(),
            batches,
            small_cfg(steps=20, max_bad_steps=3, save_every=0, eval_every=0),
            tmp_path / "b",
            objective=always_nan,
            progress=False,
        )


def test_gradient_accumulation_equals_the_big_batch(tmp_path):
    ids = torch.randint(0, 300, (8, 17))
    big = FixedBatches({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})

    class Halves:
        def __init__(self):
            self.i = 0

        def __next__(self):
            half = ids[4 * (self.i % 2) : 4 * (self.i % 2) + 4]
            self.i += 1
            return {"input_ids": half[:, :-1], "labels": half[:, 1:]}

    cfg = dict(steps=3, save_every=0, eval_every=0, grad_clip=0.0, batch_size=8)
    a, b = tiny_model(), tiny_model()
    ra = train(a, big, small_cfg(**cfg), tmp_path / "a", progress=False)
    rb = train(b, Halves(), small_cfg(**{**cfg, "grad_accum": 2, "batch_size": 4}), tmp_path / "b", progress=False)
    la = [h["loss"] for h in ra.history if "loss" in h]
    lb = [h["loss"] for h in rb.history if "loss" in h]
    assert la == pytest.approx(lb, rel=1e-5)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 300, (2, 17))
    grads = []
    for checkpointing in (False, True):
        model = tiny_model()
        if checkpointing:
            apply_activation_checkpointing(model)
        out = causal_lm(model, {"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
        out.loss_sum.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))


def test_bf16_autocast_trains(tmp_path, data_dir, model_config):
    out = pretrain(str(model_config), data_dir, tmp_path / "run", small_cfg(steps=30, dtype="bfloat16"), progress=False)
    series = losses(tmp_path / "run")
    assert series[-1] < series[0] and out.model.embed.weight.dtype == torch.float32


def test_param_groups_exclude_norms_biases_and_embeddings():
    model = Transformer(ModelConfig.from_preset("tiny-qwen2"))
    decay, no_decay = param_groups(model, 0.1)
    decayed = {id(p) for p in decay["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(".weight" in names[i] and "norm" not in names[i] and "embed" not in names[i] for i in decayed)
    assert id(model.embed.weight) not in decayed
    assert any("bias" in names[id(p)] for p in no_decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_schedules():
    assert lr_multiplier(0, 0.0, 10, "cosine") == pytest.approx(0.1)
    assert lr_multiplier(9, 0.0, 10, "cosine") == pytest.approx(1.0)
    assert lr_multiplier(50, 0.5, 10, "cosine", min_lr_ratio=0.1) == pytest.approx(0.55)
    assert lr_multiplier(99, 1.0, 10, "cosine", min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_multiplier(50, 0.7, 10, "wsd", decay_fraction=0.2) == 1.0
    assert lr_multiplier(50, 0.9, 10, "wsd", min_lr_ratio=0.0, decay_fraction=0.2) == pytest.approx(0.5)
    assert lr_multiplier(50, 0.5, 10, "linear", min_lr_ratio=0.0) == pytest.approx(0.5)
    with pytest.raises(LmforgeError, match="schedule"):
        TrainConfig(schedule="cosin")


# --- command line --------------------------------------------------------------------------------------
def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_cli_pretrain_with_config_file_and_resume(tmp_path, data_dir, model_config):
    conf = tmp_path / "run.toml"
    conf.write_text(
        f'model = "{model_config}"\ndata = "{data_dir}"\nsteps = 4\nbatch_size = 2\nseq_len = 16\n'
        "eval_every = 0\nsave_every = 2\n"
    )
    out = run_cli("pretrain", "--config", str(conf), "--out", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr
    assert "trained 4 steps" in out.stdout and "checkpoint:" in out.stdout
    again = run_cli("pretrain", "--config", str(conf), "--out", str(tmp_path / "run"))
    assert again.returncode == 2 and "--resume" in again.stderr and "Traceback" not in again.stderr
    more = run_cli("pretrain", "--config", str(conf), "--out", str(tmp_path / "run"), "--resume", "--steps", "6")
    assert more.returncode == 0, more.stderr
    assert "trained 6 steps" in more.stdout


def test_cli_prepare_and_tokenizer(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(corpus_texts()))
    tok = run_cli(
        "tokenizer",
        "train",
        str(tmp_path / "a.txt"),
        "--out",
        str(tmp_path / "tok"),
        "--vocab-size",
        "300",
        "--min-frequency",
        "1",
    )
    assert tok.returncode == 0, tok.stderr
    enc = run_cli("tokenizer", "encode", str(tmp_path / "tok"), "the cat", "--json")
    assert json.loads(enc.stdout) == Tokenizer.from_pretrained(tmp_path / "tok").encode("the cat")
    prep = run_cli(
        "prepare",
        str(tmp_path / "a.txt"),
        "--tokenizer",
        str(tmp_path / "tok"),
        "--out",
        str(tmp_path / "data"),
        "--val-fraction",
        "0",
    )
    assert prep.returncode == 0, prep.stderr
    assert (tmp_path / "data" / "index.json").is_file() and (
        tmp_path / "data" / "tokenizer" / "tokenizer.json"
    ).is_file()
    bad = run_cli(
        "prepare", str(tmp_path / "nothing-*.txt"), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "d2")
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


# --- quickstart ----------------------------------------------------------------------------------------
def test_quickstart_on_a_tiny_budget(tmp_path):
    from lmforge.quickstart import QuickstartOptions, run_quickstart

    opts = QuickstartOptions(
        out=tmp_path / "qs",
        steps=120,  # step-bounded: the same run however busy the machine is
        vocab_size=512,
        max_corpus_mb=0.4,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        seq_len=64,
        batch_size=8,
        max_new_tokens=8,
        val_fraction=0.15,
        progress=False,
    )
    r = run_quickstart(opts)
    assert r.val_bpb < r.unigram_bpb  # it learned more than token frequencies
    assert 0 < r.xz_bpb < r.gzip_bpb
    assert 0 < r.xz_context_bpb < r.xz_bpb  # xz does better after seeing the training text
    report = (tmp_path / "qs" / "report.md").read_text()
    assert f"{r.val_bpb:.3f}" in report and "def fibonacci(n):" in report
    assert f"| xz -9e with the training text as context | {r.xz_context_bpb:.3f} |" in report
    assert (tmp_path / "qs" / "run" / "loss.png").is_file() and (tmp_path / "qs" / "compression.png").is_file()
    assert all(text.startswith(prompt) for prompt, text in r.samples.items())
    result = json.loads((tmp_path / "qs" / "result.json").read_text())
    assert result["val_bpb"] == r.val_bpb and result["xz_context_bpb"] == r.xz_context_bpb
    assert (result["params"], result["tokens"], result["steps"]) == (r.params, r.tokens, r.steps) and r.steps > 0
    assert result["dtype"] in ("float32", "bfloat16") and result["matmul_peak_dtype"] == result["dtype"]
    assert result["matmul_peak_flops"] > 0 and {"gzip_bpb", "unigram_bpb", "xz_bpb", "cpu"} <= set(result)
    # What was given explicitly is what ran; the rest came from the plan.
    assert result["plan"]["hidden_size"] == 64 and result["plan"]["optimizer"] in ("adamw", "muon")
    assert r.steps == 120
    with pytest.raises(LmforgeError, match="already holds a quickstart run.*--overwrite"):
        run_quickstart(opts)
    (tmp_path / "qs" / "notes.txt").write_text("mine")
    again = run_quickstart(dataclasses.replace(opts, overwrite=True, steps=5))
    assert again.steps == 5 and (tmp_path / "qs" / "notes.txt").read_text() == "mine"


def test_torch_compile_option_trains_like_eager(tmp_path):
    """--compile runs the same steps through torch.compile (inductor's C++ backend on CPU)."""
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    batches = FixedBatches({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
    cfg = dict(steps=3, batch_size=2, seq_len=16, save_every=0, eval_every=0, warmup_steps=1)
    eager = train(tiny_model(), batches, small_cfg(**cfg), tmp_path / "a", progress=False)
    compiled = train(tiny_model(), batches, small_cfg(**cfg, compile=True), tmp_path / "b", progress=False)
    la = [h["loss"] for h in eager.history if "loss" in h]
    lb = [h["loss"] for h in compiled.history if "loss" in h]
    assert lb == pytest.approx(la, rel=1e-4)
