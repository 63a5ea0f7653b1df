"""lmforge.parallel: configs, meshes and the passes, checked against one process.

The multi-process tests launch tests/parallel_worker.py under real torchrun on CPU with gloo (one thread
per rank); each scenario runs once per module and several tests read its measurements.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lmforge import ModelConfig, Transformer
from lmforge.errors import LmforgeError
from lmforge.parallel import ParallelConfig, build_mesh, parallelize
from lmforge.parallel.checkpointing import apply_activation_checkpointing, apply_checkpointing, checkpointed_blocks
from lmforge.parallel.mesh import check_world
from lmforge.parallel.step import dp_coords, grad_sync, loss_context, normalize_grads
from lmforge.parallel.tp import check_tp
from lmforge.runtime import backend_for, is_rank0, local_rank, rank, world_size
from lmforge.train.objectives import causal_lm

WORKER = Path(__file__).with_name("parallel_worker.py")
ROOT = Path(__file__).resolve().parents[1]
# Tensor parallelism keeps float32 sums exact only up to reordering: logits and gradients agree to ~1e-7 and
# ~1e-8, parameters after one AdamW step (lr 1e-3, eps 1e-6: see parallel_worker.tp) to ~1e-6.
TOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(scenarios: list[str], nproc: int, out_dir: Path) -> dict[str, Any]:
    """Run worker scenarios on `nproc` CPU ranks under one torchrun; rank 0's measurements per scenario."""
    out = out_dir / "results.json"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",  # the ranks share 2 cores: one thread each
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        str(WORKER),
        ",".join(scenarios),
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, f"torchrun {scenarios} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


# The scenarios of one world size share a launch (torchrun and the imports take ~8 s, a scenario ~2 s).
LAUNCHES = {2: ["fsdp", "tp", "ddp"], 4: ["mesh2d"]}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory):
    """`results(scenario)`: that scenario's measurements, its launch run on first use."""
    cache: dict[str, dict[str, Any]] = {}

    def get(scenario: str) -> dict[str, Any]:
        if scenario not in cache:
            nproc = next(n for n, names in LAUNCHES.items() if scenario in names)
            cache.update(torchrun(LAUNCHES[nproc], nproc, tmp_path_factory.mktemp(f"world{nproc}")))
        return cache[scenario]

    return get


# Multi-process ------------------------------------------------------------------------------------------


def test_fsdp_gradients_are_the_mean_of_single_process_gradients(results):
    r = results("fsdp")
    # Regression for PyTorch issue 162338 (gloo's AVG reduce-scatter): the ranks' data differ, so a SUM or a
    # wrong divisor would show at the scale of the gradients themselves.
    assert r["fsdp_grad_diff"] < 1e-6 < r["fsdp_grad_max"] / 100
    assert r["fsdp_param_diff"] < TOL
    assert r["fsdp_export_keys_match"] and r["fsdp_export_diff"] < TOL


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # one process, on purpose
def test_fsdp_sharded_checkpoint_loads_in_one_plain_process(results, tmp_path_factory):
    results("fsdp")
    import torch.distributed.checkpoint as dcp

    folder = next(Path(tmp_path_factory.getbasetemp()).glob("world2*/dcp"))
    model = tiny(seed=1)  # other weights, replaced by the load
    state = model.state_dict()
    dcp.load(state, checkpoint_id=folder)  # no process group: DCP reads every shard itself
    model.load_state_dict(state)
    reference = torch.load(folder / "reference.pt")
    assert sorted(state) == sorted(reference)
    assert all(torch.allclose(state[k], reference[k], atol=TOL) for k in reference)


def test_fsdp_cpu_offload_and_bf16_compute(results):
    r = results("fsdp")
    assert r["fsdp_offload_grad_diff"] < 1e-6 and r["fsdp_offload_param_diff"] < TOL
    assert r["fsdp_offload_export_keys_match"] and r["fsdp_offload_export_diff"] < TOL
    assert r["bf16_grad_dtypes"] == ["torch.float32"]  # master weights and gradients stay fp32
    assert 0 < r["bf16_grad_diff"] < 0.05 * r["fsdp_grad_max"]  # bf16 compute: close, not equal


@pytest.mark.parametrize("case", ["tied_sp_lossparallel", "untied_plain", "glm4_sp"])
def test_tensor_parallel_forward_backward_and_step_match_one_process(results, case):
    r = results("tp")
    assert r[f"{case}_logits_dtensor"] == (case == "tied_sp_lossparallel")  # sharded only under loss parallel
    assert r[f"{case}_local_heads"] == [2, 1]  # 4 heads, 2 kv heads over 2 ranks
    assert r[f"{case}_logits_diff"] < TOL
    assert r[f"{case}_grad_diff"] < TOL
    assert r[f"{case}_param_diff"] < TOL


def test_tensor_parallel_refuses_an_unsplittable_model(results):
    message = results("tp")["bad_config_error"]
    assert message is not None and "\n" not in message
    assert "but num_kv_heads 3, intermediate_size 161 are not" in message


def test_fsdp_by_tp_mesh_trains_like_one_process(results):
    r = results("mesh2d")
    losses, ref = r["losses"], r["ref_losses"]
    assert losses[-1] < losses[0] - 0.1
    assert losses == pytest.approx(ref, abs=1e-4)
    assert r["param_diff"] < 1e-4
    # Every parameter lives on the 2-D mesh: FSDP's shard over dp, and TP's (or the norms' replica) over tp.
    assert r["meshes"] == ["('dp', 'tp')"]
    assert "(Shard(dim=0), Replicate())" in r["placements"] and "(Shard(dim=0), Shard(dim=1))" in r["placements"]
    assert r["export_diff"] < 1e-4  # gather_model: the full weights on rank 0
    assert "needs the sequence length divisible by 2, got 15 tokens" in r["odd_length_error"]


def test_ddp_matches_one_process_on_the_global_batch(results):
    r = results("ddp")
    assert r["wrapper"] == "DistributedDataParallel"
    assert r["grad_diff"] < 1e-6
    # Accumulation with no_sync and ranks holding unequal token counts: still the exact global mean.
    assert r["global_weight"] == r["ref_weight"]
    assert r["accum_grad_diff"] < 1e-6
    assert r["param_diff"] < TOL


# One process --------------------------------------------------------------------------------------------


def tiny(seed: int = 0, preset: str = "tiny-llama") -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset(preset))


def grads_of(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    out = causal_lm(model, {"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
    out.loss_sum.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode,every", [("full", 1), ("selective", 2), ("selective", 1)])
def test_activation_checkpointing_gives_the_same_gradients(mode, every):
    ids = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(0))
    plain = grads_of(tiny(preset="tiny-glm4"), ids)
    model = tiny(preset="tiny-glm4")
    chosen = apply_checkpointing(model, mode, every)
    assert chosen == ([0, 1] if every == 1 else [1])
    got = grads_of(model, ids)
    assert list(got) == list(plain)  # names unchanged: no wrapper module in the tree
    assert all(torch.allclose(got[n], plain[n], atol=1e-6) for n in plain)
    with pytest.raises(LmforgeError, match="already checkpointed"):
        apply_checkpointing(model, "full")


def test_old_entry_point_and_block_choice():
    model = tiny()
    apply_activation_checkpointing(model)
    assert sorted(model.state_dict()) == sorted(tiny().state_dict())
    assert checkpointed_blocks(8, "selective", 3) == [2, 5]
    assert checkpointed_blocks(8, "none") == [] and checkpointed_blocks(3, "full") == [0, 1, 2]


def test_parallelize_in_one_process_applies_checkpointing_once():
    ids = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(0))
    plain = grads_of(tiny(), ids)
    model = tiny()
    config = ParallelConfig(parallel="fsdp")
    assert build_mesh(config, 1, "cpu") is None  # no process group: FSDP of one rank is the plain model
    assert parallelize(model, config, None, compile=False, dtype="float32", checkpointing="full") is model
    got = grads_of(model, ids)
    assert all(torch.allclose(got[n], plain[n], atol=1e-6) for n in plain)
    with pytest.raises(LmforgeError, match="already parallelized"):
        parallelize(model, config, None, compile=False, dtype="float32")
    with pytest.raises(LmforgeError, match="resolved training dtype"):
        parallelize(tiny(), config, None, compile=False, dtype="auto")
    with pytest.raises(LmforgeError, match="needs a process group"):
        parallelize(
            tiny(), ParallelConfig(parallel="fsdp", fsdp_cpu_offload=True), None, compile=False, dtype="float32"
        )


def test_step_helpers_without_a_mesh():
    model = tiny()
    assert dp_coords(None) == (0, 1)
    with grad_sync(model, False), loss_context(ParallelConfig()):
        out = causal_lm(model, {"input_ids": torch.zeros(1, 5, dtype=torch.long), "labels": torch.ones(1, 5).long()})
        out.loss_sum.backward()
    before = model.embed.weight.grad.clone()
    assert normalize_grads(model.parameters(), 5.0, None) == 5.0
    assert torch.allclose(model.embed.weight.grad, before / 5)


@pytest.mark.parametrize(
    "degree,match",
    [
        (3, "num_heads 4, num_kv_heads 2, intermediate_size 160, vocab_size 512 are not"),
        (4, "num_kv_heads 2 is not"),
        (0, "degree must be >= 1"),
    ],
)
def test_check_tp_names_the_numbers(degree, match):
    with pytest.raises(LmforgeError, match=match) as e:
        check_tp(ModelConfig.from_preset("tiny-llama"), degree)
    assert "\n" not in str(e.value)


def test_check_tp_accepts_divisible_models():
    check_tp(ModelConfig.from_preset("tiny-llama"), 2)
    check_tp(ModelConfig.from_preset("tiny-llama"), 1)
    with pytest.raises(LmforgeError, match="but vocab_size 511 is not;"):
        check_tp(ModelConfig.from_preset("tiny-llama").replace(vocab_size=511), 2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(parallel="zero"), "parallel must be one of"),
        (dict(parallel="ddp", tp=2), "has no tensor parallelism"),
        (dict(parallel="fsdp", loss_parallel=True), "loss_parallel shards"),
        (dict(parallel="ddp", fsdp_cpu_offload=True), "fsdp_cpu_offload needs FSDP"),
        (dict(tp=-1), "tp must be >= 0"),
        (dict(parallel="tp", tp="2"), "tp must be an integer"),
    ],
)
def test_parallel_config_refuses_bad_values(kwargs, match):
    with pytest.raises(LmforgeError, match=match):
        ParallelConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,world,match",
    [
        (dict(), 2, "strategy none trains one copy per process"),
        (dict(parallel="tp", tp=2), 4, r"tp 2 != world size 4"),
        (dict(parallel="fsdp+tp", tp=4), 6, "6 processes do not split into groups of 4"),
    ],
)
def test_world_size_checks(kwargs, world, match):
    with pytest.raises(LmforgeError, match=match):
        check_world(ParallelConfig(**kwargs), world)


def test_degrees_and_config_round_trip():
    assert ParallelConfig(parallel="tp").tp_degree(4) == 4
    assert ParallelConfig(parallel="fsdp+tp").tp_degree(8) == 2
    assert ParallelConfig(parallel="fsdp+tp", tp=4).tp_degree(8) == 4
    assert ParallelConfig(parallel="fsdp").tp_degree(8) == 1
    c = ParallelConfig(parallel="fsdp+tp", tp=2, loss_parallel=True)
    assert ParallelConfig.from_dict(c.to_dict()) == c
    with pytest.raises(LmforgeError, match="needs the process group"):
        build_mesh(ParallelConfig(parallel="ddp"), 2, "cpu")


def test_env_without_torchrun(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert (rank(), local_rank(), world_size(), is_rank0()) == (0, 0, 1, True)
    assert backend_for("cpu") == "gloo" and backend_for("cuda") == "nccl"
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(LmforgeError, match="WORLD_SIZE='two' must be an integer"):
        world_size()
