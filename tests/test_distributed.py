"""`lmforge pretrain` under real torchrun (CPU, gloo, one thread per rank): the data order is the same for
every decomposition, so 2 ranks with accumulation 1 reproduce 1 process with accumulation 2; a sharded
checkpoint written by 2 ranks resumes in 1 process on the same loss curve; two "nodes" on loopback."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import corpus_texts

from lmforge.tokenizer import Tokenizer

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on loopback")

STEPS = ["--steps", "4", "--batch-size", "2", "--seq-len", "16", "--eval-every", "0", "--save-every", "2"]
STEPS += ["--lr", "3e-3", "--warmup-steps", "1", "--dtype", "float32", "--seed", "3"]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    from lmforge.data import prepare

    root = tmp_path_factory.mktemp("dist")
    texts = corpus_texts()  # the training tests' corpus
    for i, t in enumerate(texts):
        (root / f"d{i:02d}.txt").write_text(t)
    tok = Tokenizer.train(texts, 300, "llama3", min_frequency=1)
    prepare([str(root / "*.txt")], tok, root / "data", val_fraction=0.1, seed=0, progress=False)
    config = root / "model.json"
    config.write_text(
        json.dumps(
            {
                "vocab_size": 300,
                "hidden_size": 32,
                "num_layers": 2,
                "num_heads": 4,
                "num_kv_heads": 2,
                "intermediate_size": 64,
                "max_position_embeddings": 64,
                "tie_embeddings": False,
            }
        )
    )
    return root / "data", config


def pretrain(*args: str, nproc: int = 0, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    if nproc:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", *extra]
        launcher += ["--master-port", str(free_port())] if "--nnodes=2" not in extra else []
        cmd = [*launcher, "-m", "lmforge", "pretrain", *args]
    else:
        cmd = [sys.executable, "-m", "lmforge", "pretrain", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300)


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_ddp_and_fsdp_on_two_ranks_equal_one_process_with_accumulation(tmp_path, data):
    d, config = data
    base = ["--model", str(config), "--data", str(d), *STEPS]
    one = pretrain(*base, "--out", str(tmp_path / "one"), "--grad-accum", "2")
    assert one.returncode == 0, one.stderr
    # fsdp+tp on 4 ranks: 2 data-parallel groups of 2 tensor-parallel ranks (TP sums in another order: 1e-5)
    for strategy, nproc, tol in (("ddp", 2, 1e-6), ("fsdp", 2, 1e-6), ("fsdp+tp", 4, 1e-5)):
        two = pretrain(*base, "--out", str(tmp_path / strategy), "--parallel", strategy, nproc=nproc)
        assert two.returncode == 0, two.stderr[-3000:]
        assert two.stdout.count("trained 4 steps") == 1  # rank 0 alone reports
        a, b = losses(tmp_path / "one"), losses(tmp_path / strategy)
        assert sorted(a) == sorted(b) == [1, 2, 3, 4]  # rank 0 alone logs: each step once
        assert all(abs(a[s] - b[s]) < tol for s in a), (strategy, a, b)
    # The sharded run's checkpoint holds an HF export transformers can read, and its shards.
    ckpt = tmp_path / "fsdp" / "checkpoints" / "step-00000004"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "dcp" / ".metadata").is_file()
    import torch
    from transformers import AutoModelForCausalLM

    import lmforge

    ids = torch.tensor([[1, 5, 9, 42, 7]])
    ours = lmforge.load_pretrained(ckpt)(ids)
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(ckpt).eval()(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    # Every strategy also trains with bf16 autocast over fp32 weights and activation checkpointing.
    for strategy, checkpointing in (("ddp", "full"), ("fsdp", "selective"), ("tp", "full")):
        run = tmp_path / f"{strategy}-bf16"
        extra = ("--dtype", "bfloat16", "--activation-checkpointing", checkpointing, "--steps", "2")
        done = pretrain(*base, *extra, "--out", str(run), "--parallel", strategy, nproc=2)
        assert done.returncode == 0, done.stderr[-3000:]
        assert sorted(losses(run)) == [1, 2] and all(math.isfinite(v) for v in losses(run).values())


def test_a_two_rank_checkpoint_resumes_in_one_process_on_the_same_curve(tmp_path, data):
    d, config = data
    base = ["--model", str(config), "--data", str(d), *STEPS, "--schedule", "constant"]  # the same lr at 4 or 6 steps
    whole = pretrain(*base, "--out", str(tmp_path / "whole"), "--grad-accum", "2", "--steps", "6")
    assert whole.returncode == 0, whole.stderr
    first = pretrain(*base, "--out", str(tmp_path / "split"), "--parallel", "fsdp", nproc=2)
    assert first.returncode == 0, first.stderr[-3000:]
    # Again without --resume: rank 0 refuses, and every rank stops with its one-line reason (none hangs).
    again = pretrain(*base, "--out", str(tmp_path / "split"), "--parallel", "fsdp", nproc=2)
    assert again.returncode != 0 and again.stderr.count("already holds a run") == 2, again.stderr[-3000:]
    rest = pretrain(*base, "--out", str(tmp_path / "split"), "--grad-accum", "2", "--steps", "6", "--resume")
    assert rest.returncode == 0, rest.stderr
    a, b = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    assert all(abs(a[s] - b[s]) < 1e-5 for s in a), (a, b)


def test_two_nodes_on_loopback_train_like_one_process(tmp_path, data):
    d, config = data
    base = ["--model", str(config), "--data", str(d), *STEPS, "--steps", "2"]
    one = pretrain(*base, "--out", str(tmp_path / "one"), "--grad-accum", "2")
    assert one.returncode == 0, one.stderr
    port = free_port()
    nodes = []
    for rank in (0, 1):
        rdzv = ["--nnodes=2", f"--node-rank={rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}"]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", *rdzv]
        cmd = [*launcher, "-m", "lmforge", "pretrain", *base, "--out", str(tmp_path / "nodes"), "--parallel", "ddp"]
        nodes.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env()))
    outs = [n.communicate(timeout=300) for n in nodes]
    assert all(n.returncode == 0 for n in nodes), [o[1][-2000:] for o in outs]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "nodes")
    assert sorted(b) == [1, 2] and all(abs(a[s] - b[s]) < 1e-6 for s in a), (a, b)


def test_ddp_with_accumulation_syncs_once_and_stays_exact(tmp_path, data):
    """2 ranks x accumulation 2 == 1 process x accumulation 4: no_sync covers each micro-batch's forward and
    backward, and the gradients are scaled to the global token mean afterwards."""
    d, config = data
    base = ["--model", str(config), "--data", str(d), *STEPS, "--steps", "3"]
    one = pretrain(*base, "--out", str(tmp_path / "one"), "--grad-accum", "4")
    assert one.returncode == 0, one.stderr
    two = pretrain(*base, "--out", str(tmp_path / "two"), "--grad-accum", "2", "--parallel", "ddp", nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(b) == [1, 2, 3] and all(abs(a[s] - b[s]) < 1e-6 for s in a), (a, b)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> tuple[Path, Path]:
    import torch

    import lmforge
    from lmforge import ModelConfig, Transformer

    root = tmp_path_factory.mktemp("chat")
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"question {i}?"},
                {"role": "assistant", "content": f"The answer to question {i} is {i * 7 % 13}."},
            ]
        }
        for i in range(24)
    ]
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [m["content"] for r in rows for m in r["messages"]]
    tok = Tokenizer.train(texts, 290, "llama3", min_frequency=1)
    config = ModelConfig.from_preset("tiny-llama").replace(
        vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tuple(tok.stop_token_ids)
    )
    torch.manual_seed(0)
    lmforge.save_pretrained(Transformer(config), root / "model")
    tok.save(root / "model")
    return root / "model", root / "chat.jsonl"


def finetune(*args: str, nproc: int = 0) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    launcher += ["--master-port", str(free_port())]
    cmd = [*(launcher if nproc else [sys.executable]), "-m", "lmforge", "finetune", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300)


def quantized_copy(model: Path, out: Path, method: str) -> Path:
    cmd = [sys.executable, "-m", "lmforge", "quantize", "--model", str(model), "--out", str(out), "--method", method]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300)
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize(
    "method,strategy,quant", [("full", "ddp", ""), ("lora", "ddp", ""), ("lora", "fsdp", ""), ("lora", "fsdp", "int4")]
)
def test_finetune_under_ddp_and_fsdp_equals_one_process(tmp_path, chat_model, method, strategy, quant):
    model, chats = chat_model
    if quant:  # QLoRA: adapters over a frozen int4 base, the quantized buffers replicated on every rank
        model = quantized_copy(model, tmp_path / "q", quant)
    base = ["--model", str(model), "--data", str(chats), "--steps", "3", "--batch-size", "2", "--seq-len", "48"]
    base += ["--eval-every", "0", "--save-every", "0", "--method", method, "--dtype", "float32", "--lr", "1e-3"]
    one = finetune(*base, "--out", str(tmp_path / "one"), "--grad-accum", "2")
    assert one.returncode == 0, one.stderr
    two = finetune(*base, "--out", str(tmp_path / "two"), "--parallel", strategy, nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(b) == [1, 2, 3] and all(abs(a[s] - b[s]) < 1e-6 for s in a), (a, b)
    if method == "lora":  # the adapters alone, as in one process, and the same adapters
        from safetensors.torch import load_file

        name = "checkpoints/step-00000003/adapter_model.safetensors"
        ours, theirs = load_file(tmp_path / "one" / name), load_file(tmp_path / "two" / name)
        assert sorted(ours) == sorted(theirs) and len(ours) > 0
        assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours)


def test_a_sharded_qlora_run_resumes_on_the_same_curve(tmp_path, chat_model):
    model, chats = chat_model
    base = ["--model", str(quantized_copy(model, tmp_path / "q", "int8")), "--data", str(chats), "--batch-size", "2"]
    base += ["--seq-len", "48", "--eval-every", "0", "--method", "lora", "--dtype", "float32", "--lr", "1e-3"]
    base += ["--parallel", "fsdp", "--schedule", "constant", "--warmup-steps", "1"]  # one lr whatever the length
    whole = finetune(*base, "--steps", "4", "--save-every", "4", "--out", str(tmp_path / "whole"), nproc=2)
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = finetune(*base, "--steps", "2", "--save-every", "2", "--out", str(tmp_path / "split"), nproc=2)
    assert first.returncode == 0, first.stderr[-3000:]
    rest = finetune(*base, "--steps", "4", "--save-every", "4", "--out", str(tmp_path / "split"), "--resume", nproc=2)
    assert rest.returncode == 0, rest.stderr[-3000:]
    a, b = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert sorted(b) == [1, 2, 3, 4] and all(abs(a[s] - b[s]) < 1e-6 for s in a), (a, b)  # the adapters' shards


def test_a_one_process_checkpoint_resumes_on_two_ranks_on_the_same_curve(tmp_path, data):
    d, config = data
    base = ["--model", str(config), "--data", str(d), *STEPS, "--schedule", "constant"]
    whole = pretrain(*base, "--out", str(tmp_path / "whole"), "--grad-accum", "2", "--steps", "6")
    assert whole.returncode == 0, whole.stderr
    first = pretrain(*base, "--out", str(tmp_path / "split"), "--grad-accum", "2")
    assert first.returncode == 0, first.stderr
    rest = pretrain(*base, "--out", str(tmp_path / "split"), "--steps", "6", "--resume", "--parallel", "fsdp", nproc=2)
    assert rest.returncode == 0, rest.stderr[-3000:]
    a, b = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    assert all(abs(a[s] - b[s]) < 1e-5 for s in a), (a, b)


def test_dpo_and_distill_under_ddp_equal_one_process(tmp_path, chat_model, data):
    model, _ = chat_model
    prefs = tmp_path / "prefs.jsonl"
    rows = [{"prompt": f"q{i}?", "chosen": f"yes {i}", "rejected": f"no {i % 3}"} for i in range(16)]
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run(command, args, out, nproc=0):
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
        launcher += ["--master-port", str(free_port())]
        cmd = [*(launcher if nproc else [sys.executable]), "-m", "lmforge", command, *args, "--out", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return losses(out)

    common = ["--steps", "3", "--batch-size", "2", "--seq-len", "32", "--eval-every", "0", "--save-every", "0"]
    common += ["--dtype", "float32", "--lr", "1e-3"]
    dpo = ["--model", str(model), "--data", str(prefs), "--val-fraction", "0", *common]
    one = run("dpo", [*dpo, "--grad-accum", "2"], tmp_path / "dpo1")
    two = run("dpo", [*dpo, "--parallel", "ddp"], tmp_path / "dpo2", nproc=2)
    assert sorted(two) == [1, 2, 3] and all(abs(one[s] - two[s]) < 1e-6 for s in one), (one, two)
    d, config = data
    teacher = tmp_path / "teacher"
    trained = pretrain("--model", str(config), "--data", str(d), *STEPS, "--steps", "2", "--out", str(teacher))
    assert trained.returncode == 0, trained.stderr
    distill = ["--teacher", str(teacher / "checkpoints" / "step-00000002"), "--student", str(config)]
    distill += ["--data", str(d), *common]
    one = run("distill", [*distill, "--grad-accum", "2"], tmp_path / "kd1")
    two = run("distill", [*distill, "--parallel", "fsdp"], tmp_path / "kd2", nproc=2)
    assert sorted(two) == [1, 2, 3] and all(abs(one[s] - two[s]) < 1e-6 for s in one), (one, two)
