"""`lmforge plan` against hand-computed numbers and against what lmforge's own training step really holds.

The measurements run in fresh processes (this file run as a script). One process: one training step of a
small model per case, as lmforge.train.loop runs it (every micro-batch's forward in autocast, then each
backward, clip, optimizer step, zero_grad); weights, gradients and optimizer state are counted from the
tensors themselves, the activations are the bytes autograd saves, summed exactly with
torch.autograd.graph.saved_tensors_hooks (each storage once, parameters left out), and the peak is the
high-water mark of every CPU allocation in the step from torch.profiler's memory events (profile_memory),
over the weights and optimizer state that exist before it. Two ranks under torchrun (gloo): the
activations each rank saves under lmforge.parallel's tensor parallelism. `python tests/test_plan.py
--table` prints the measured-vs-predicted tables (docs/distributed_plan.md shows them).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.planner import PlanConfig, plan_training
from lmforge.planner.activations import Layout, block_matrix_elements, block_terms
from lmforge.planner.params import block_params, model_params

SMALL = dict(
    vocab_size=2048,
    hidden_size=128,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=384,
    max_position_embeddings=1024,
    family="llama",
)
GLM4 = dict(
    SMALL,
    family="glm4",
    hidden_size=192,
    num_heads=6,
    intermediate_size=512,
    vocab_size=4096,
    qkv_bias=True,
    rope_interleaved=True,
    partial_rotary_factor=0.5,
    post_sublayer_norms=True,
)
WIDE = dict(SMALL, vocab_size=256, intermediate_size=1024)  # small vocabulary: a block's backward sets the peak
# 32 thin layers under checkpointing: autocast's cache of bf16 weight copies sets the peak
DEEP = dict(SMALL, hidden_size=64, num_layers=32, num_heads=2, num_kv_heads=1, intermediate_size=256, vocab_size=256)
QWEN = dict(SMALL, family="qwen2", qkv_bias=True, tie_embeddings=True, vocab_size=4096, hidden_size=256, num_heads=8)


def case(model: dict, batch: int, seq_len: int, dtype: str, ckpt: bool = False, **more) -> dict:
    return dict(model=model, batch=batch, seq_len=seq_len, dtype=dtype, ckpt=ckpt, **more)


# One process, 1.3M-3.5M parameters. params "bf16": the weights the forward reads are bf16, as when FSDP
# all-gathers them in bf16 (MixedPrecisionPolicy): the model is cast to bf16 and run under autocast, which is
# the same computation on one process (only the activations are compared: its weights are not FSDP's).
CASES = {
    "llama fp32": case(SMALL, 4, 128, "float32"),
    "llama fp32 ckpt": case(SMALL, 4, 128, "float32", True),
    "llama bf16 muon": case(SMALL, 2, 256, "bfloat16", optimizer="muon"),
    "glm4 fp32": case(GLM4, 8, 64, "float32"),
    "glm4 bf16": case(GLM4, 2, 128, "bfloat16"),
    "qwen tied bf16 accum2": case(QWEN, 2, 128, "bfloat16", accum=2),
    "qwen tied fp32 muon b1": case(QWEN, 1, 64, "float32", optimizer="muon"),
    "wide fp32": case(WIDE, 8, 128, "float32"),
    "wide bf16 ckpt": case(WIDE, 8, 128, "bfloat16", True),
    "deep bf16 ckpt": case(DEEP, 4, 128, "bfloat16", True),
    "llama bf16 params": case(SMALL, 4, 128, "bfloat16", params="bf16"),
    "glm4 bf16 params ckpt": case(GLM4, 4, 128, "bfloat16", True, params="bf16"),
}
# Two CPU ranks of lmforge.parallel's tensor parallelism (gloo): the activations each rank saves.
TP_CASES = {
    "llama tp2 fp32": case(SMALL, 4, 128, "float32", sp=True, lp=False),
    "llama tp2 fp32, no sequence parallel": case(SMALL, 4, 128, "float32", sp=False, lp=False),
    "llama tp2 bf16": case(SMALL, 4, 128, "bfloat16", sp=True, lp=False),
    "llama tp2 fp32 loss parallel ckpt": case(SMALL, 4, 128, "float32", True, sp=True, lp=True),
    "glm4 tp2 bf16": case(GLM4, 4, 128, "bfloat16", sp=True, lp=False),
    "glm4 tp2 bf16, no sequence parallel": case(GLM4, 4, 128, "bfloat16", sp=False, lp=False),
}


def _saved_bytes_hook(own: set[int], saved: dict[int, int]):
    """A saved-tensors pack hook that sums each storage once, leaving out the parameters' own storages."""
    import torch
    from torch.distributed.tensor import DTensor

    def pack(t: torch.Tensor) -> torch.Tensor:
        local = t._local_tensor if isinstance(t, DTensor) else t
        s = local.untyped_storage()
        if s.data_ptr() not in own:
            saved.setdefault(s.data_ptr(), s.nbytes())
        return t

    return pack


def _batches(c: dict, vocab: int) -> list[dict]:
    import torch

    out = []
    for _ in range(c.get("accum", 1)):
        ids = torch.randint(0, vocab, (c["batch"], c["seq_len"] + 1))
        out.append({"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()})
    return out


def _measure(c: dict) -> dict:
    """One measured training step of case `c` (in this fresh process), as lmforge.train.loop runs it: every
    micro-batch's forward in autocast, then each backward, clip, optimizer step, zero_grad. Bytes per term."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from lmforge.model import Transformer
    from lmforge.parallel.checkpointing import apply_activation_checkpointing
    from lmforge.runtime import autocast
    from lmforge.train.objectives import causal_lm
    from lmforge.train.optim import build_optimizer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**c["model"])).train()
    if c.get("params") == "bf16":
        model.to(torch.bfloat16)
    if c["ckpt"]:
        apply_activation_checkpointing(model)
    opt = build_optimizer(model, 1e-3, kind=c.get("optimizer", "adamw"))
    params = list(model.parameters())
    micro = _batches(c, c["model"]["vocab_size"])
    saved: dict[int, int] = {}
    pack = _saved_bytes_hook({p.untyped_storage().data_ptr() for p in params}, saved)

    def step(record: dict) -> None:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outs = []
            for b in micro:
                with autocast(c["dtype"], "cpu"):
                    outs.append(causal_lm(model, b))
                    with record_function("forward end"):  # still inside autocast: its weight cache is alive
                        pass
        record["saved"] = sum(saved.values())
        total = sum(float(o.weight) for o in outs)
        for o in outs:
            (o.loss_sum / total).backward()
        del outs
        record["gradients"] = sum(p.grad.untyped_storage().nbytes() for p in params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step({})  # the first step creates the optimizer state
    saved.clear()
    record: dict = {}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(record)
    events = list(prof.profiler.kineto_results.events())
    forward_end = max(e.start_ns() for e in events if e.name() == "forward end")
    live = high = at_forward_end = 0
    for e in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        live += e.nbytes()
        high = max(high, live)
        at_forward_end = live if e.start_ns() <= forward_end else at_forward_end
    record["weights"] = sum(p.untyped_storage().nbytes() for p in params)
    state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    record["optimizer"] = sum(v.untyped_storage().nbytes() for v in state)
    record["peak"] = record["weights"] + record["optimizer"] + high
    record["forward_end"] = at_forward_end  # over weights and optimizer state
    return record


def _measure_tp(cases: dict, out: str) -> None:
    """Under torchrun: each case's forward under lmforge.parallel's TP; every rank's saved bytes to `out`."""
    import contextlib

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import loss_parallel

    from lmforge.model import Transformer
    from lmforge.parallel.checkpointing import apply_activation_checkpointing
    from lmforge.parallel.tp import apply_tp
    from lmforge.runtime import autocast
    from lmforge.train.objectives import causal_lm

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    results: dict[str, list[int]] = {}
    for name, c in cases.items():
        torch.manual_seed(0)
        model = Transformer(ModelConfig(**c["model"]))
        apply_tp(model, mesh, sequence_parallel=c["sp"], loss_parallel=c["lp"])  # then checkpointing, as
        if c["ckpt"]:  # lmforge.parallel.parallelize orders them
            apply_activation_checkpointing(model)
        own = {
            (p._local_tensor if isinstance(p, DTensor) else p).untyped_storage().data_ptr() for p in model.parameters()
        }
        saved: dict[int, int] = {}
        (b,) = _batches(c, c["model"]["vocab_size"])
        hooks = torch.autograd.graph.saved_tensors_hooks(_saved_bytes_hook(own, saved), lambda t: t)
        with hooks, loss_parallel() if c["lp"] else contextlib.nullcontext(), autocast(c["dtype"], "cpu"):
            loss = causal_lm(model, b).loss_sum
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, sum(saved.values()))
        results[name] = gathered
        del loss
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def measure_in_subprocess() -> dict:
    """{case name: measured bytes}, from a fresh Python process that runs every case in turn."""
    argv = [sys.executable, __file__, json.dumps(CASES)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_tp_under_torchrun(out_dir) -> dict:
    """{case name: [saved bytes of rank 0, rank 1]} from two CPU ranks under torchrun."""
    import os
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    }
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    out = os.path.join(str(out_dir), "tp.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2", "--master-addr=127.0.0.1"]
    cmd += [f"--master-port={port}", __file__, "--tp", json.dumps(TP_CASES), out]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=root, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out) as f:
        return json.load(f)


def _plan_for(c: dict, **parallel) -> PlanConfig:
    if c.get("params") == "bf16":
        parallel = {"strategy": "fsdp", **parallel}  # bf16 parameters: FSDP's mixed precision
    return PlanConfig(
        seq_len=c["seq_len"],
        batch_size=c["batch"],
        dtype=c["dtype"],
        activation_checkpointing=c["ckpt"],
        optimizer=c.get("optimizer", "adamw"),
        grad_accum=c.get("accum", 1),
        kernels="cpu",
        **parallel,
    )


def _predict(c: dict) -> dict:
    plan = plan_training(ModelConfig(**c["model"]), _plan_for(c))
    forward_end = plan.memory["activations"] + plan.memory["autocast_cache"]  # the logits are gone by then
    return {**plan.memory, "peak_moment": plan.peak_moment, "params": plan.params, "forward_end": forward_end}


def _predict_tp(c: dict) -> int:
    cfg = _plan_for(c, gpus=2, strategy="tp", sequence_parallel=c["sp"], loss_parallel=c["lp"])
    return plan_training(ModelConfig(**c["model"]), cfg).memory["activations"]


@pytest.fixture(scope="module")
def measured() -> dict:
    return measure_in_subprocess()


@pytest.fixture(scope="module")
def measured_tp(tmp_path_factory) -> dict:
    pytest.importorskip("lmforge.parallel.tp")
    return measure_tp_under_torchrun(tmp_path_factory.mktemp("tp"))


def table(measured: dict, measured_tp: dict | None = None) -> str:
    """The measured-vs-predicted tables (printed by `python tests/test_plan.py --table`)."""
    rows = [
        "| case | params | weights+grads+optimizer (MB) | activations measured / predicted (MB) | error "
        "| peak measured / predicted (MB) | error | peak at | end of forward measured / predicted (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in CASES.items():
        m, p = measured[name], _predict(c)
        act = f"{m['saved'] / 1e6:.3f} / {p['activations'] / 1e6:.3f} | {p['activations'] / m['saved'] - 1:+.2%}"
        end = f"{m['forward_end'] / 1e6:.3f} / {p['forward_end'] / 1e6:.3f}"
        if c.get("params") == "bf16":  # FSDP's state is not what one bf16 process holds: activations only
            rows.append(f"| {name} | {p['params'] / 1e6:.2f}M | - | {act} | - | - | - | {end} |")
            continue
        state = (p["weights"] + p["gradients"] + p["optimizer"]) / 1e6
        rows.append(
            f"| {name} | {p['params'] / 1e6:.2f}M | {state:.3f} (exact) | {act} | {m['peak'] / 1e6:.3f} / "
            f"{p['peak'] / 1e6:.3f} | {p['peak'] / m['peak'] - 1:+.2%} | {p['peak_moment']} | {end} |"
        )
    if measured_tp:
        rows += ["", "| TP case (2 ranks) | activations measured per rank (MB) | predicted (MB) | error |"]
        rows.append("|---|---|---|---|")
        for name, c in TP_CASES.items():
            m, p = measured_tp[name], _predict_tp(c)
            shown = " / ".join(f"{v / 1e6:.3f}" for v in m)
            rows.append(f"| {name} | {shown} | {p / 1e6:.3f} | {p / max(m) - 1:+.2%} |")
    return "\n".join(rows)


@pytest.mark.parametrize("name", list(CASES))
def test_plan_matches_measured_training_step(measured: dict, name: str):
    m, p = measured[name], _predict(CASES[name])
    assert p["activations"] == pytest.approx(m["saved"], rel=0.15)
    assert p["forward_end"] == pytest.approx(m["forward_end"], rel=0.15)  # autocast's weight cache
    if CASES[name].get("params") == "bf16":
        return
    assert p["weights"] == m["weights"]
    assert p["gradients"] == m["gradients"]
    assert p["optimizer"] == m["optimizer"]
    assert p["peak"] == pytest.approx(m["peak"], rel=0.15)


@pytest.mark.parametrize("name", list(TP_CASES))
def test_plan_matches_tensor_parallel_activations(measured_tp: dict, name: str):
    m = measured_tp[name]
    assert m[0] == m[1]  # the ranks are symmetric
    assert _predict_tp(TP_CASES[name]) == pytest.approx(m[0], rel=0.15)


# --- by hand ------------------------------------------------------------------------------------------------
def test_plan_by_hand_fsdp_tp_as_lmforge_parallel_runs_it():
    """SMALL (h 128, 4 layers, 4 heads / 2 kv heads of 32, I 384, V 2048, untied), batch 2 x 64 = 128 tokens,
    bf16, AdamW, 4 GPUs as fsdp+tp with tp 2 (dp 2), lmforge.parallel's defaults: FSDP gathers bf16 weights
    (so the residual stream is bf16 and nothing is autocast-copied), sequence parallelism on. Every number
    below is worked out by hand."""
    c = ModelConfig(**SMALL)
    plan = plan_training(c, PlanConfig(gpus=4, strategy="fsdp+tp", tp=2, seq_len=64, batch_size=2))
    assert (plan.dp, plan.tp) == (2, 2)
    # parameters: per block q 128*128 + k, v 2 * 128*64 + o 128*128 + 3 * 128*384 = 196,608 matmul + 2 * 128 norm;
    # embed and head 2048*128 each, final norm 128
    assert plan.params == 4 * (196_608 + 256) + 2 * 262_144 + 128 == 1_311_872
    # per device: matrices / 2 (TP) / 2 (FSDP); norms / 2 (FSDP only; replicated by TP)
    local = 4 * (196_608 // 4 + 256 // 2) + 2 * 262_144 // 4 + 128 // 2
    assert plan.memory["weights"] == plan.memory["gradients"] == 4 * local == 1_313_024
    tensors = 4 * 9 + 3  # 7 matrices + 2 norms per block; embed, final norm, head: one 4-byte step each
    assert plan.memory["optimizer"] == 8 * local + 4 * tensors
    n, norm = 128, (4 * 128 * 128 + 4 * 128 + 2 * 128 * 128) // 2  # fp32 copy, rsqrt, bf16 normed: / 2 by SP
    per_block = {
        "attn_norm": norm + 2 * n * 128,  # + the all-gathered bf16 output q/k/v share (whole)
        "attention": 2 * (2 * n * 128 // 2 + 2 * n * 64 // 2) + 4 * n * 4 // 2,  # bf16 q, k, v, out; fp32 lse
        "mlp_norm": norm + 2 * n * 128,
        "mlp": 4 * 2 * n * 384 // 2,
    }
    assert plan.act.per_block == per_block
    head = norm + 2 * n * 128 + 4 * n * 2048  # the final norm, and the fp32 log-softmax of whole logits
    assert plan.act.once == {"rope": 2 * 2 * n * 32, "tokens": 16 * n, "head": head}
    assert plan.memory["activations"] == 4 * sum(per_block.values()) + 2 * 2 * n * 32 + 16 * n + head
    assert plan.act.saved(True) == 4 * 2 * n * 128 // 2 + 2 * 2 * n * 32 + 16 * n + head  # bf16 inputs / SP
    assert plan.memory["loss_backward"] == 2 * 4 * n * 2048
    # gathered in bf16: the root (embedding, final norm, head: / 2 by TP but the norm) and two blocks
    assert plan.memory["fsdp_gathered"] == 2 * ((2048 * 128 // 2) * 2 + 128 + 2 * (196_608 // 2 + 256))
    assert plan.peak_moment == "loss backward"
    assert plan.memory["peak"] == (
        plan.memory["weights"]
        + plan.memory["optimizer"]
        + plan.memory["fsdp_gathered"]
        + plan.memory["activations"]
        + plan.memory["loss_backward"]
    )
    assert plan.kv_cache["bytes_per_token"] == 2 * 4 * 2 * 32 * 2 // 2
    flops = 6 * (4 * 196_608 + 4 * 256 + 128 + 2048 * 128) + 12 * 4 * 4 * 32 * 64
    assert plan.throughput["flops_per_token"] == flops
    assert plan.throughput["tokens_per_step"] == 2 * 64 * 2
    assert plan.throughput["step_time_s"] == pytest.approx(flops * 256 / (4 * 989e12 * 0.4))


def test_plan_by_hand_tp_with_autocast_and_no_sequence_parallelism():
    """The same model and batch on 2 GPUs of pure TP without sequence parallelism: fp32 weights under bf16
    autocast, so every matmul saves its own bf16 cast of its input and of its weight; norms stay whole."""
    cfg = PlanConfig(gpus=2, strategy="tp", seq_len=64, batch_size=2, sequence_parallel=False)
    plan = plan_training(ModelConfig(**SMALL), cfg)
    n = 128
    per_block = {
        "attn_norm": 4 * n * 128 + 4 * n + 4 * n * 128 + 3 * 2 * n * 128,
        "attention": 2 * (2 * n * 128 // 2 + 2 * n * 64 // 2) + 4 * n * 4 // 2,
        "mlp_norm": 4 * n * 128 + 4 * n + 4 * n * 128 + 2 * 2 * n * 128,
        "mlp": 4 * 2 * n * 384 // 2,
        "weight_copies": 2 * 196_608 // 2,
    }
    assert plan.act.per_block == per_block
    head = 4 * n * 128 + 4 * n + 4 * n * 128 + 2 * n * 128 + 4 * n * 2048 + 2 * (2048 // 2) * 128
    assert plan.act.once == {"rope": 2 * 4 * n * 32, "tokens": 16 * n, "head": head}
    assert plan.memory["weights"] == 4 * (4 * (196_608 // 2 + 256) + 2 * 262_144 // 2 + 128)
    assert plan.memory["fsdp_gathered"] == 0 and "grad_buckets" not in plan.memory


def test_strategies_divide_the_terms():
    c = ModelConfig.from_preset("llama-3.1-8b")
    base = PlanConfig(seq_len=4096, batch_size=1)
    one = plan_training(c, base).memory
    ddp = plan_training(c, replace(base, gpus=8)).memory
    fsdp = plan_training(c, replace(base, gpus=8, strategy="fsdp", fsdp_mixed_precision=False)).memory
    fsdp_mp = plan_training(c, replace(base, gpus=8, strategy="fsdp")).memory
    tp = plan_training(c, replace(base, gpus=8, strategy="tp", sequence_parallel=False)).memory
    tp_sp = plan_training(c, replace(base, gpus=8, strategy="tp")).memory
    both = plan_training(c, replace(base, gpus=16, strategy="fsdp+tp", tp=8, fsdp_mixed_precision=False)).memory
    assert ddp["weights"] == one["weights"] and ddp["grad_buckets"] == one["gradients"]
    assert ddp["activations"] == one["activations"]
    assert fsdp["weights"] == pytest.approx(one["weights"] / 8, rel=1e-3)
    assert fsdp["optimizer"] == pytest.approx(one["optimizer"] / 8, rel=1e-3)
    assert fsdp["activations"] == one["activations"] and fsdp["fsdp_gathered"] > 0
    assert fsdp_mp["weights"] == fsdp["weights"] and fsdp_mp["activations"] < fsdp["activations"]
    assert fsdp_mp["fsdp_gathered"] == fsdp["fsdp_gathered"] // 2  # gathered in bf16
    assert tp["weights"] == pytest.approx(one["weights"] / 8, rel=1e-3)  # only the norms are replicated
    assert one["activations"] / 8 < tp_sp["activations"] < tp["activations"] < one["activations"]
    assert both["weights"] == pytest.approx(one["weights"] / 16, rel=1e-3)
    assert both["activations"] == tp_sp["activations"]  # the TP split alone decides them
    ckpt = plan_training(c, replace(base, activation_checkpointing=True))
    assert ckpt.memory["activations"] == ckpt.act.saved(True) < ckpt.act.saved(False) == one["activations"]
    assert ckpt.memory["recompute"] == ckpt.act.block


def test_parameter_accounting_matches_the_model():
    from lmforge.info import count_parameters

    for preset in ("tiny-llama", "tiny-qwen2", "tiny-glm", "tiny-glm4", "qwen2.5-72b"):
        c = ModelConfig.from_preset(preset)
        assert sum(p.numel for p in model_params(c)) == count_parameters(c)[0]
        matrices = sum(p.numel for p in block_params(c) if p.hidden)
        assert block_matrix_elements(c) == matrices
        assert block_terms(c, 8, Layout(compute=2, params=4), "cuda")["weight_copies"] == 2 * matrices
        assert "weight_copies" not in block_terms(c, 8, Layout(compute=2, params=2), "cuda")


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(gpus=8, strategy="fsdp+tp", tp=3), ["8", "not divisible by --tp 3"]),
        (dict(gpus=8, strategy="tp", tp=4), ["--tp must be 8", "got 4", "fsdp+tp"]),
        (dict(gpus=8, strategy="fsdp", tp=2), ["--tp 2", "fsdp"]),
        (dict(mfu=1.5), ["mfu", "1.5"]),
        (dict(batch_size=0), ["batch_size", "0"]),
        (dict(strategy="zero3"), ["strategy", "zero3"]),
    ],
)
def test_plan_config_errors_name_the_numbers(kwargs, words):
    with pytest.raises(LmforgeError) as info:
        PlanConfig(**kwargs)
    for w in words:
        assert w in str(info.value)


def test_default_tp_degrees():
    assert PlanConfig(gpus=8, strategy="tp").tp_degree == 8
    assert (PlanConfig(gpus=8, strategy="fsdp+tp").tp_degree, PlanConfig(gpus=8, strategy="fsdp+tp").dp_degree) == (
        2,
        4,
    )
    assert PlanConfig(gpus=8, strategy="fsdp").tp_degree == 1


def test_model_dependent_errors():
    c = ModelConfig.from_preset("qwen2.5-72b")  # 64 heads, 8 kv heads, I 29568
    with pytest.raises(LmforgeError, match="num_kv_heads 8 is not divisible by tp 16"):
        plan_training(c, PlanConfig(gpus=64, strategy="fsdp+tp", tp=16))
    with pytest.raises(LmforgeError, match="seq_len 200000 exceeds"):
        plan_training(c, PlanConfig(seq_len=200_000))


# --- the command ----------------------------------------------------------------------------------------------
def test_every_option_is_a_flag():
    import argparse

    from lmforge.cli import build_parser
    from lmforge.options import specs

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["plan"]
    by_dest = {a.dest: a for a in sub._actions}
    for spec in specs(PlanConfig):
        assert by_dest[spec.name].default is argparse.SUPPRESS  # the dataclass's default is the only one


def test_docs_show_what_the_command_prints(capsys):
    """Every `$ lmforge plan ...` block of docs/distributed_plan.md is followed by exactly its output."""
    import re
    import shlex
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "distributed_plan.md").read_text()
    blocks = re.findall(r"```console\n\$ lmforge (plan .*?)\n(.*?)\n```", doc, flags=re.S)
    assert len(blocks) == 3
    for command, shown in blocks:
        assert main(shlex.split(command)) == 0
        assert capsys.readouterr().out.rstrip("\n") == shown, command


def test_cli_json(capsys):
    argv = ["plan", "--model", "llama-3.1-8b", "--gpus", "8", "--strategy", "fsdp", "--seq-len", "8192", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["parallel"] == {"strategy": "fsdp", "gpus": 8, "dp": 8, "tp": 1}
    assert out["memory"]["weights"] * 8 == pytest.approx(4 * out["params"], rel=1e-3)
    assert out["plan"]["seq_len"] == 8192 and out["throughput"]["tokens_per_s"] > 0
    assert out["activations"]["with_checkpointing"] < out["activations"]["without_checkpointing"]


def test_cli_table(capsys):
    assert main(["plan", "--model", "tiny-llama", "--seq-len", "64", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    for word in ("weights", "gradients", "optimizer", "activations", "peak", "KV cache", "tokens/s"):
        assert word in out


def test_cli_bad_tp_is_one_line_exit_2(capsys):
    argv = ["plan", "--model", "llama-3.1-8b", "--gpus", "8", "--strategy", "fsdp+tp", "--tp", "3"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmforge plan: error:") and "--tp 3" in err
    assert main(["plan", "--model", "llama-3.1-8b", "--gpus", "6", "--strategy", "tp"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "num_heads 32 is not divisible by tp 6" in err


if __name__ == "__main__":
    if sys.argv[1:] == ["--table"]:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            print(table(measure_in_subprocess(), measure_tp_under_torchrun(tmp)))
    elif sys.argv[1] == "--tp":
        _measure_tp(json.loads(sys.argv[2]), sys.argv[3])
    else:
        print(json.dumps({name: _measure(c) for name, c in json.loads(sys.argv[1]).items()}))
