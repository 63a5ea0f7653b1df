"""Sharded checkpoints across decompositions: the helpers tests/test_dcp.py uses in its own (plain, no
process group) process, and one rank of its two-process runs under torchrun on CPU (gloo):

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dcp_worker.py SCENARIO[,...] DIR

Every run trains the same tiny model from the same seed on the same global batches: micro-batch i is fixed
by i, a global step takes MICRO of them, and rank r of w data-parallel ranks reads every w-th (RankShare),
accumulating MICRO / w; tensor-parallel ranks all read every micro-batch. A run saves at step SAVE_AT with
the protocol the training loop follows (lmforge.parallel.dcp), writes its full weights and optimizer state
there (REF_FILE) and its losses, and trains on to step STEPS.

    save   fsdp, ddp and tp runs at world 2, each saved to DIR/<strategy>; then an fsdp save whose commit
           never happens (a kill between save_sharded and the checkpoint's rename), left for recovery
    load   the plain run in DIR/none (saved by the test process) resumed under fsdp, ddp and tp at world
           2, and the fsdp run resumed under ddp; full state right after loading, and the losses after
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from lmforge import ModelConfig, Transformer
from lmforge.checkpoint import save_pretrained
from lmforge.data.loader import RankShare
from lmforge.parallel import ParallelConfig, build_mesh, parallelize
from lmforge.parallel.dcp import committing, discard, load_sharded, save_sharded, staging_dir
from lmforge.parallel.export import full_state_dict, gather_model
from lmforge.parallel.step import dp_coords, grad_sync
from lmforge.runtime import barrier, destroy, init_distributed, is_rank0, world_size
from lmforge.train.checkpoints import latest_checkpoint, load_trainer_state, rng_state, save_checkpoint
from lmforge.train.objectives import causal_lm
from lmforge.train.optim import build_optimizer

CONFIG = ModelConfig.from_preset("tiny-llama")
LR = 1e-3
MICRO = 2  # micro-batches per global step
ROWS, SEQ = 2, 16  # each micro-batch's [B, T]
SAVE_AT, STEPS = 2, 4
REF_FILE = "reference.pt"  # in the run directory: full weights and optimizer state at SAVE_AT
STRATEGIES = ("fsdp", "ddp", "tp")


class FixedBatches:
    """Micro-batch i is a function of i alone; the position is the whole state."""

    def __init__(self) -> None:
        self.position = 0

    def __next__(self) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + self.position)
        ids = torch.randint(0, CONFIG.vocab_size, (ROWS, SEQ + 1), generator=g)  # [B, T+1]
        self.position += 1
        return {"input_ids": ids[:, :-1], "labels": ids[:, 1:].clone()}

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


@dataclass
class Run:
    model: Transformer
    step_model: nn.Module  # what parallelize returned: the DDP wrapper, or the model itself
    optimizer: torch.optim.Optimizer
    mesh: DeviceMesh | None
    loader: RankShare


def build(strategy: str, seed: int = 0) -> Run:
    """The model under `strategy` ("none": one plain process), its AdamW and its share of the batches."""
    torch.manual_seed(seed)
    model = Transformer(CONFIG)
    mesh, step_model = None, model
    if strategy != "none":
        pc = ParallelConfig(parallel=strategy)
        mesh = build_mesh(pc, world_size(), "cpu")
        step_model = parallelize(model, pc, mesh, compile=False, dtype="float32")
    index, count = dp_coords(mesh)
    return Run(model, step_model, build_optimizer(model, LR), mesh, RankShare(FixedBatches(), index, count))


def _value(t: torch.Tensor) -> float:
    return float((t.full_tensor() if isinstance(t, DTensor) else t).detach())


def train(run: Run, steps: int) -> list[float]:
    """`steps` AdamW steps on the global batches; each step's loss is the global token mean."""
    _, count = dp_coords(run.mesh)
    group = run.mesh["dp"].get_group() if count > 1 else None
    losses = []
    for _ in range(steps):
        outs = [causal_lm(run.step_model, next(run.loader)) for _ in range(MICRO // count)]
        totals = torch.tensor(
            [sum(_value(o.weight) for o in outs), sum(_value(o.loss_sum) for o in outs)], dtype=torch.float64
        )
        if group is not None:
            dist.all_reduce(totals, group=group)
        weight, loss_sum = totals.tolist()
        for i, o in enumerate(outs):
            with grad_sync(run.step_model, i == len(outs) - 1):
                (o.loss_sum / weight * count).backward()  # DDP/FSDP average over the count ranks
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        losses.append(loss_sum / weight)
    return losses


def save(run: Run, run_dir: Path, step: int) -> Path | None:
    """The loop's save: shards from every rank, then rank 0's atomic checkpoint (HF weights, trainer state,
    and the shards moved in). Returns the checkpoint on rank 0."""
    staging = staging_dir(run_dir / "checkpoints", step)
    save_sharded(staging, run.step_model, run.optimizer)
    plain = gather_model(run.step_model)  # a collective too: the HF export beside the shards
    final = None
    if is_rank0():
        assert plain is not None
        state = {"step": step, "loader": run.loader.state_dict(), "rng": rng_state()}  # no "optimizer": in dcp/
        try:
            final = save_checkpoint(run_dir, step, plain, state, save_model=committing(staging, save_pretrained))
        finally:
            discard(staging)
    barrier()
    return final


def resume(strategy: str, ckpt: Path, seed: int = 123) -> Run:
    """The loop's resume, from a model initialised differently (`seed`) so that only the load can match."""
    run = build(strategy, seed)
    load_sharded(ckpt, run.step_model, run.optimizer)
    run.loader.load_state_dict(load_trainer_state(ckpt)["loader"])
    return run


def reference(run: Run) -> dict[str, Any]:
    """Full weights and optimizer state under the model's own names (rank 0; empty elsewhere)."""
    if dist.is_initialized():
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optim = get_optimizer_state_dict(run.step_model, run.optimizer, options=options)
    else:
        optim = get_optimizer_state_dict(run.step_model, run.optimizer)
    return {"model": full_state_dict(run.step_model), "optim": optim}


def state_diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """How two `reference` states differ: key sets, and the largest difference of weights, Adam moments, steps."""
    out: dict[str, Any] = {
        "model_keys_equal": sorted(a["model"]) == sorted(b["model"]),
        "optim_keys_equal": sorted(a["optim"]["state"]) == sorted(b["optim"]["state"]),
        "param_groups_equal": [{k: v for k, v in g.items() if k != "params"} for g in a["optim"]["param_groups"]]
        == [{k: v for k, v in g.items() if k != "params"} for g in b["optim"]["param_groups"]],
    }
    out["model_diff"] = max(float((a["model"][k] - b["model"][k]).abs().max()) for k in a["model"])
    for name in ("exp_avg", "exp_avg_sq", "step"):
        out[f"{name}_diff"] = max(
            float((torch.as_tensor(s[name]) - torch.as_tensor(b["optim"]["state"][k][name])).abs().max())
            for k, s in a["optim"]["state"].items()
        )
    return out


def scenario_save(root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for strategy in STRATEGIES:
        run = build(strategy)
        losses = train(run, SAVE_AT)
        save(run, root / strategy, SAVE_AT)
        ref = reference(run)
        if is_rank0():
            torch.save(ref, root / strategy / REF_FILE)
        losses += train(run, STEPS - SAVE_AT)
        out[strategy] = {"losses": losses}
        if strategy == "fsdp":  # killed after save_sharded, before the commit: the staging is left behind
            staging = staging_dir(root / strategy / "checkpoints", STEPS)
            save_sharded(staging, run.step_model, run.optimizer)
            out["killed_staging"] = str(staging)
    return out


def scenario_load(root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for source, strategy in [("none", s) for s in STRATEGIES] + [("fsdp", "ddp")]:
        ckpt = latest_checkpoint(root / source)
        assert ckpt is not None
        run = resume(strategy, ckpt)
        ref = reference(run)
        case: dict[str, Any] = {}
        if is_rank0():
            case.update(state_diff(torch.load(root / source / REF_FILE, weights_only=True), ref))
        case["losses"] = train(run, STEPS - SAVE_AT)
        out[f"{source}_to_{strategy}"] = case
    return out


SCENARIOS = {"save": scenario_save, "load": scenario_load}


def main() -> None:
    torch.set_num_threads(1)
    scenarios, root = sys.argv[1].split(","), Path(sys.argv[2])
    init_distributed()
    try:  # several scenarios in one launch: starting the processes costs more than running them
        for scenario in scenarios:
            result = SCENARIOS[scenario](root)
            if is_rank0():
                (root / f"{scenario}.json").write_text(json.dumps(result, indent=2))
    finally:
        destroy()


if __name__ == "__main__":
    main()
