"""Sharded training state with torch.distributed.checkpoint (DCP): each rank writes only its own shards of
the model and optimizer, and any other decomposition reads them back (resharding), so a run saved under
FSDP, DDP or TP at one world size resumes under any strategy at any world size, a single plain process
included.

Inside a run checkpoint (lmforge/train/checkpoints.py) the shards sit in one more directory:

    <run>/checkpoints/step-00000100/dcp/.metadata      the global layout (written last, by rank 0)
                                       __0_0.distcp     rank 0's shards; __1_0.distcp rank 1's, ...

A checkpoint directory is written by rank 0 alone and renamed into place atomically (lmforge.atomic), but
the shards come from every rank, so they are staged first and moved in while rank 0 assembles the rest:

    all ranks:  staging = staging_dir(root, step)     # rank 0 names it, the others receive the name
    all ranks:  save_sharded(staging, model, opt)      # a collective; returns once .metadata is written
    rank 0:     save_checkpoint(..., save_model=committing(staging, ...))   # moves staging to <tmp>/dcp
    rank 0:     discard(staging)                       # in a `finally`: a save that failed before the move
    all ranks:  barrier()

The staging directory is `checkpoints/.step-00000100.partial-PID-START-RAND` with rank 0's PID and start
time, lmforge.atomic's name for a writer's unfinished work: a kill before the move leaves it behind, and
the next start's recovery (checkpoints.recover_run, or the next write_directory of that step) deletes it
once rank 0 is dead, and never while rank 0 is alive. It lies in the checkpoints directory itself, so the
move into the checkpoint's temporary directory is a rename on one filesystem.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.optim import Optimizer

from lmforge.atomic import fsync_dir, temp_name
from lmforge.errors import LmforgeError
from lmforge.model import Transformer

DCP_DIR = "dcp"  # the shards' directory inside a checkpoint
METADATA = ".metadata"  # DCP's global plan; rank 0 writes it after every rank wrote its shards


def _group() -> bool:
    """Whether a process group is live (DCP then coordinates the ranks; else it runs in this process alone)."""
    return dist.is_available() and dist.is_initialized()


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    # dcp.save/load warn on every single-process call ("torch.distributed is disabled, unavailable or
    # uninitialized, assuming the intent is to ... in a single process"), even with no_dist=True: that is
    # the intent here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def staging_dir(root: Path, step: int) -> Path:
    """A fresh, empty directory in `root` (the run's checkpoints directory) for step `step`'s shards, the
    same path on every rank. A collective when a process group is live: every rank must call it.

    Rank 0 creates `.step-NNNNNNNN.partial-PID-START-RAND` (lmforge.atomic's name for a live writer's
    unfinished work: recovery removes it only after rank 0 died) and broadcasts the path. `root` must be on
    a filesystem every rank sees (a shared one across machines)."""
    root = Path(root).resolve()
    name: list[str | None] = [None]
    if not _group() or dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        while True:
            path = root / temp_name(f"step-{step:08d}", "partial")
            try:
                path.mkdir()  # exclusive: a name another save holds is never shared
            except FileExistsError:
                continue
            break
        fsync_dir(root)
        name[0] = str(path)
    if _group() and dist.get_world_size() > 1:
        dist.broadcast_object_list(name, src=0)
    assert name[0] is not None
    return Path(name[0])


def _state(model: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
    # get_state_dict names every entry by the model's own parameter names (without DDP's `module.`,
    # compile's `_orig_mod.` or a checkpoint wrapper's prefix), keeps FSDP2 and TP parameters and their
    # Adam moments as DTensors (each rank holds its shards; DCP writes and reads only those), and first
    # gives an optimizer that never stepped its state (a zero-gradient step at lr 0) so loading has targets.
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state}


def save_sharded(staging: Path, model: nn.Module, optimizer: Optimizer) -> None:
    """Write `model`'s and `optimizer`'s state into `staging` (from `staging_dir`), each rank its own shards.

    `model` is what lmforge.parallel.parallelize returned (the DDP wrapper) or the Transformer itself: both
    give the same names. A collective when a process group is live: every rank calls it with the same
    `staging`, and it returns on each rank once rank 0 wrote `.metadata`, i.e. once every rank's shards are
    complete and fsynced. Without a process group (one plain process) it writes everything from here."""
    state = _state(model, optimizer)
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=os.fspath(staging), no_dist=not _group())


def commit_into(staging: Path, checkpoint_tmp: Path) -> Path:
    """Move the finished `staging` directory to `<checkpoint_tmp>/dcp` (one rename) and return that path.

    Rank 0 calls it inside save_checkpoint's write callback, on the checkpoint's temporary directory, so the
    shards enter the checkpoint with the same atomic rename as its other files (and its manifest, when the
    callback runs before write_manifest, lists them). Refuses a staging directory whose save did not
    finish."""
    staging, target = Path(staging), Path(checkpoint_tmp) / DCP_DIR
    if not (staging / METADATA).is_file():
        raise LmforgeError(
            f"{staging} holds no {METADATA}: its sharded save did not finish; call save_sharded on every rank "
            "before committing it."
        )
    if target.exists():
        raise LmforgeError(f"{target} already exists; commit the shards into a fresh checkpoint directory.")
    os.rename(staging, target)  # same filesystem: staging_dir puts staging in the checkpoints directory
    return target


def committing(
    staging: Path, save_model: Callable[[Transformer, Path], Any] | None = None
) -> Callable[[Transformer, Path], None]:
    """A `save_model` callback for lmforge.train.checkpoints.save_checkpoint (rank 0): run `save_model(model,
    tmp)` if given (e.g. save_pretrained of the gathered full model, for an HF export beside the shards),
    then `commit_into(staging, tmp)`."""

    def write(model: Transformer, tmp: Path) -> None:
        if save_model is not None:
            save_model(model, tmp)
        commit_into(staging, tmp)

    return write


def discard(staging: Path) -> None:
    """Delete `staging` if it is still there (rank 0, in a `finally` after save_checkpoint: a save that failed
    before `commit_into` moved it). Harmless after a successful commit."""
    if Path(staging).is_dir():
        shutil.rmtree(staging, ignore_errors=True)


def has_sharded(ckpt_dir: Path) -> bool:
    """Whether the checkpoint holds DCP shards (its optimizer state is then there, not in trainer_state.pt)."""
    return (Path(ckpt_dir) / DCP_DIR / METADATA).is_file()


def load_sharded(ckpt_dir: Path, model: nn.Module, optimizer: Optimizer) -> None:
    """Load `<ckpt_dir>/dcp` into `model` and `optimizer` in place, whatever decomposition wrote it.

    Call after lmforge.parallel.parallelize and build_optimizer, on every rank when a process group is live
    (a collective), or in one plain process without any. Each rank reads only the pieces of the saved
    tensors that its own shards cover. Parameters, Adam moments, step counts and the param groups'
    hyperparameters are restored; the model and optimizer must be built as at save time (same config, same
    optimizer and parameter groups)."""
    path = Path(ckpt_dir) / DCP_DIR
    if not (path / METADATA).is_file():
        raise LmforgeError(
            f"{ckpt_dir} holds no sharded state ({DCP_DIR}/{METADATA} is missing); it was not saved by a "
            "sharded run: resume it with its trainer_state.pt optimizer, or choose a sharded checkpoint."
        )
    state = _state(model, optimizer)
    try:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=os.fspath(path), no_dist=not _group())
    except CheckpointException as e:
        raise LmforgeError(
            f"cannot load the sharded state in {path}: {_first_failure(e)}. Build the model with the checkpoint's "
            "config.json and the optimizer with the run's settings, or resume from another checkpoint."
        ) from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _first_failure(e: CheckpointException) -> str:
    """The lowest failed rank's error, in one line (DCP keeps an (exception, traceback) pair per rank)."""
    for _rank, failure in sorted((getattr(e, "failures", None) or {}).items()):
        error = failure[0] if isinstance(failure, tuple) and failure else failure
        text = str(error).strip()
        if text:
            return text.splitlines()[0].rstrip(".")
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def load_plain_optimizer(model: nn.Module, optimizer: Optimizer, plain_state: dict[str, Any]) -> None:
    """Load a single process's `optimizer.state_dict()` (parameters keyed by their index in the param
    groups) into the optimizer of the parallelized `model`, on every rank: a one-process run resumed under
    torchrun. The optimizer must be built as in the plain run (same groups, same order), so index i is the
    i-th parameter of the groups here; its full state is given by name and each rank keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    saved_groups = plain_state["param_groups"]
    if sum(len(g["params"]) for g in saved_groups) != len(order):
        raise LmforgeError(
            f"the checkpoint's optimizer holds {sum(len(g['params']) for g in saved_groups)} parameters and this "
            f"run's {len(order)}; resume with the run's own model and optimizer settings."
        )
    index = {i: order[k] for k, i in enumerate(i for g in saved_groups for i in g["params"])}
    state = {index[i]: value for i, value in plain_state["state"].items()}
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [index[i] for i in g["params"]]}
        for g in saved_groups
    ]
    set_optimizer_state_dict(
        model, optimizer, {"state": state, "param_groups": groups}, options=StateDictOptions(full_state_dict=True)
    )
