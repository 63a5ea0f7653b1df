"""Sharded checkpoints (lmforge.parallel.dcp) resume under another decomposition: FSDP, DDP and TP at world
2 -> one plain process, one plain process -> FSDP, DDP and TP at world 2, FSDP 2 -> DDP 2; with the
same weights and Adam moments right after the load and the same losses afterwards as the uninterrupted run.
A save killed before its commit leaves only a staging directory, which recovery removes.

The plain process is this test process itself (no process group); the world-2 runs are one torchrun
launch of tests/dcp_worker.py (gloo on CPU).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import dcp_worker as w
import pytest
import torch
import torch.distributed as dist

from lmforge import Transformer
from lmforge.errors import LmforgeError
from lmforge.parallel.dcp import DCP_DIR, commit_into, discard, has_sharded, load_sharded, save_sharded, staging_dir
from lmforge.train.checkpoints import checkpoint_damage, latest_checkpoint, recover_run
from lmforge.train.optim import build_optimizer

LOSS_TOL = 1e-6
WORKER = Path(__file__).with_name("dcp_worker.py")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The plain run (here), then the world-2 runs: DIR/<strategy> each, and what the workers measured."""
    assert not dist.is_initialized(), "the plain run must have no process group"
    root = tmp_path_factory.mktemp("dcp")
    run = w.build("none")
    losses = w.train(run, w.SAVE_AT)
    w.save(run, root / "none", w.SAVE_AT)
    torch.save(w.reference(run), root / "none" / w.REF_FILE)
    losses += w.train(run, w.STEPS - w.SAVE_AT)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",  # the ranks share 2 cores: one thread each
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # --standalone sets them
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run(
        [*cmd, str(WORKER), "save,load", str(root)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    results = {"none": {"losses": losses}}
    for scenario in ("save", "load"):
        results.update(json.loads((root / f"{scenario}.json").read_text()))
    return root, results


def _exact(diff: dict[str, Any]) -> None:
    assert diff["model_keys_equal"] and diff["optim_keys_equal"] and diff["param_groups_equal"], diff
    for name in ("model_diff", "exp_avg_diff", "exp_avg_sq_diff", "step_diff"):
        assert diff[name] == 0.0, (name, diff)


def _same_losses(resumed: list[float], uninterrupted: list[float]) -> None:
    assert len(resumed) == w.STEPS - w.SAVE_AT
    for a, b in zip(resumed, uninterrupted[w.SAVE_AT :], strict=True):
        assert abs(a - b) <= LOSS_TOL, (resumed, uninterrupted)


def test_runs_agree_before_any_resume(runs):
    """The decompositions train alike on the same global batches (the premise of the comparisons below)."""
    _, results = runs
    for strategy in w.STRATEGIES:
        for a, b in zip(results[strategy]["losses"], results["none"]["losses"], strict=True):
            assert abs(a - b) <= LOSS_TOL, (strategy, results[strategy]["losses"], results["none"]["losses"])


@pytest.mark.parametrize("strategy", w.STRATEGIES)
def test_world2_resumes_in_one_plain_process(runs, strategy):
    root, results = runs
    ckpt = latest_checkpoint(root / strategy)
    assert ckpt is not None and ckpt.name == f"step-{w.SAVE_AT:08d}" and has_sharded(ckpt)
    assert checkpoint_damage(ckpt) is None
    manifest = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert {f"{DCP_DIR}/.metadata", f"{DCP_DIR}/__0_0.distcp", f"{DCP_DIR}/__1_0.distcp"} <= set(manifest)
    assert "optimizer" not in torch.load(ckpt / "trainer_state.pt", weights_only=True)
    run = w.resume("none", ckpt)
    _exact(w.state_diff(torch.load(root / strategy / w.REF_FILE, weights_only=True), w.reference(run)))
    _same_losses(w.train(run, w.STEPS - w.SAVE_AT), results[strategy]["losses"])


@pytest.mark.parametrize("strategy", w.STRATEGIES)
def test_plain_process_resumes_at_world2(runs, strategy):
    _, results = runs
    case = results[f"none_to_{strategy}"]
    _exact(case)
    _same_losses(case["losses"], results["none"]["losses"])


def test_fsdp_resumes_as_ddp(runs):
    _, results = runs
    case = results["fsdp_to_ddp"]
    _exact(case)
    _same_losses(case["losses"], results["fsdp"]["losses"])


def test_killed_save_leaves_a_staging_directory_that_recovery_removes(runs, tmp_path):
    """The fsdp workers staged step 4's shards and exited without committing them (as if killed)."""
    root, results = runs
    run_dir = root / "fsdp"
    staging = Path(results["killed_staging"])
    assert staging.parent == run_dir / "checkpoints" and staging.name.startswith(f".step-{w.STEPS:08d}.partial-")
    assert {p.name for p in staging.iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp"}  # complete
    assert latest_checkpoint(run_dir).name == f"step-{w.SAVE_AT:08d}"  # the uncommitted step never counted
    live = staging_dir(run_dir / "checkpoints", 9)  # this (live) process's own staging is never touched
    recover_run(run_dir)
    assert not staging.exists() and live.is_dir()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p != live) == [
        "latest",
        f"step-{w.SAVE_AT:08d}",
    ]
    assert checkpoint_damage(latest_checkpoint(run_dir)) is None
    discard(live)
    assert not live.exists()


def test_manifest_catches_a_truncated_shard(runs, tmp_path):
    root, _ = runs
    ckpt = tmp_path / "checkpoints" / f"step-{w.SAVE_AT:08d}"
    shutil.copytree(latest_checkpoint(root / "fsdp"), ckpt)
    shard = ckpt / DCP_DIR / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    assert checkpoint_damage(ckpt) == f"{DCP_DIR}/__1_0.distcp has 100 bytes, the manifest says " + str(
        json.loads((ckpt / "manifest.json").read_text())["files"][f"{DCP_DIR}/__1_0.distcp"]
    )


def test_refusals(runs, tmp_path):
    root, _ = runs
    model = Transformer(w.CONFIG)
    opt = build_optimizer(model, w.LR)
    with pytest.raises(LmforgeError, match="holds no sharded state"):
        load_sharded(tmp_path, model, opt)
    other = Transformer(w.CONFIG.replace(num_layers=3))
    with pytest.raises(LmforgeError, match="Missing key in checkpoint state_dict: model.layers.2"):
        load_sharded(latest_checkpoint(root / "none"), other, build_optimizer(other, w.LR))
    staging = staging_dir(tmp_path / "checkpoints", 1)
    assert staging.name.startswith(".step-00000001.partial-")
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(LmforgeError, match="did not finish"):
        commit_into(staging, tmp_path / "ckpt")
    save_sharded(staging, model, opt)
    assert commit_into(staging, tmp_path / "ckpt") == tmp_path / "ckpt" / DCP_DIR
    assert not staging.exists() and has_sharded(tmp_path / "ckpt")
