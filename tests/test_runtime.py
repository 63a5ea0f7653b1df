"""The precision probe: `--dtype auto` measures instead of assuming, and autocast follows the parameters."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lmforge import runtime
from lmforge.errors import LmforgeError

# Makes an x86 CPU dispatch like an AVX2-only one (no AVX-512, no bf16 instructions): what CI may run on.
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


@pytest.fixture
def fake_rates(monkeypatch):
    """Set the probe's measured FLOP/s per dtype by hand."""

    def install(fp32: float, bf16: float) -> None:
        rates = {torch.float32: fp32, torch.bfloat16: bf16}
        monkeypatch.setattr(runtime, "_matmul_rate", lambda dtype, device, limit_s=None: rates[dtype])
        runtime._probe.cache_clear()

    yield install
    runtime._probe.cache_clear()


@pytest.mark.parametrize(
    "fp32, bf16, train, infer_bf16",
    [
        (180e9, 650e9, "bfloat16", torch.bfloat16),  # AVX-512 BF16: bf16 ~3.6x faster
        (83e9, 0.8e9, "float32", torch.float32),  # AVX2 only: bf16 100x slower
        (100e9, 120e9, "float32", torch.bfloat16),  # bf16 a bit faster: not enough for training, fine to decode
        (100e9, 30e9, "float32", torch.float32),
    ],
)
def test_auto_picks_bf16_only_where_it_is_faster(fake_rates, fp32, bf16, train, infer_bf16):
    fake_rates(fp32, bf16)
    assert runtime.training_dtype("auto") == train
    assert runtime.training_dtype("float32") == "float32" and runtime.training_dtype("bfloat16") == "bfloat16"
    assert runtime.inference_dtype("auto", torch.bfloat16) == infer_bf16
    assert runtime.inference_dtype("auto", torch.float32) == torch.float32  # never downcast unasked
    assert runtime.inference_dtype("auto", torch.float16) == torch.float32  # fp16 on CPU is a slow path
    assert runtime.inference_dtype("bfloat16", torch.float32) == torch.bfloat16
    text = runtime.probe_precision().describe()
    assert train in text and f"{bf16 / 1e9:.1f}" in text and f"{fp32 / 1e9:.1f}" in text


def test_the_probe_is_measured_once_per_process(monkeypatch):
    runtime._probe.cache_clear()
    calls = []
    real = runtime._matmul_rate
    monkeypatch.setattr(runtime, "_matmul_rate", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    first = runtime.probe_precision("cpu")
    assert runtime.probe_precision(torch.device("cpu")) is first
    assert calls == [torch.float32, torch.bfloat16]
    assert first.float32_flops > 1e9 and first.bfloat16_flops > 0  # real measurements
    runtime._probe.cache_clear()


def test_unknown_dtype_is_refused():
    with pytest.raises(LmforgeError, match="unknown dtype 'fp8'"):
        runtime.training_dtype("fp8")


def test_on_an_avx2_only_cpu_auto_trains_in_float32_and_fast():
    """In a process dispatching like an AVX2-only CPU, bf16 matmuls take the slow path: auto must pick fp32,
    and the probe must stay short even though one bf16 matmul there is ~100x slower."""
    code = (
        "import time, torch; from lmforge import runtime; t = time.perf_counter(); p = runtime.probe_precision(); "
        "print(p.choice, time.perf_counter() - t, p.bfloat16_flops / p.float32_flops)"
    )
    env = {**os.environ, **AVX2_ONLY, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("not an x86 CPU")
    choice, seconds, ratio = out.stdout.split()
    assert choice == "float32" and float(ratio) < 0.5
    assert float(seconds) < 0.5


def test_autocast_follows_the_parameters_device(monkeypatch):
    seen = []

    class Recorder:
        def __init__(self, device_type, dtype):
            seen.append((device_type, dtype))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch, "autocast", Recorder)
    with runtime.autocast("bfloat16", torch.device("meta")):
        pass
    with runtime.autocast(torch.bfloat16, "cpu"):
        pass
    with runtime.autocast("float32", "cpu"):  # fp32: no autocast at all
        pass
    assert seen == [("meta", torch.bfloat16), ("cpu", torch.bfloat16)]
    model = torch.nn.Linear(2, 2, device="meta")
    assert runtime.model_device(model).type == "meta"


def test_training_records_and_prints_the_resolved_dtype(tmp_path, fake_rates, capsys):
    """run.json holds what `auto` became (not "auto"), and the run says so when it starts."""
    import json

    from lmforge.cli import main
    from lmforge.data import prepare
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.config import TrainConfig, resolve_precision

    fake_rates(83e9, 0.8e9)
    assert resolve_precision(TrainConfig()).dtype == "float32"
    assert resolve_precision(TrainConfig(dtype="bfloat16")).dtype == "bfloat16"
    fake_rates(180e9, 650e9)
    assert resolve_precision(TrainConfig()).dtype == "bfloat16"

    fake_rates(83e9, 0.8e9)  # an AVX2-like machine
    texts = [f"line {i} of a small corpus with words that repeat: the cat sat on the mat." for i in range(80)]
    for i, text in enumerate(texts):
        (tmp_path / f"d{i}.txt").write_text(text)
    tok = Tokenizer.train(texts, 300, "llama3", min_frequency=1)
    prepare([str(tmp_path / "*.txt")], tok, tmp_path / "data", val_fraction=0.1, progress=False)
    model = {
        "vocab_size": 300,
        "hidden_size": 32,
        "num_layers": 1,
        "num_heads": 2,
        "num_kv_heads": 1,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
    }
    (tmp_path / "m.json").write_text(json.dumps(model))
    args = [
        "pretrain",
        "--model",
        str(tmp_path / "m.json"),
        "--data",
        str(tmp_path / "data"),
        "--out",
        str(tmp_path / "run"),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--warmup-steps",
        "1",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "precision: float32 (matmul probe" in out
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["train"]["dtype"] == "float32"
