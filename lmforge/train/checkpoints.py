"""Run checkpoints: an HF-format model directory plus everything needed to resume exactly.

    <run>/run.json, metrics.jsonl, loss.png      the run's settings, per-step log and plot
    <run>/checkpoints/step-00000100/            config.json, model.safetensors, tokenizer files,
                                                trainer_state.pt, manifest.json (written last)
    <run>/checkpoints/latest                    the name of the newest complete checkpoint

A checkpoint is assembled in a temporary directory (lmforge.atomic), fsynced, renamed into place, and only
then does `latest` move to it (itself replaced atomically), so a crash at any point - a SIGKILL, a power
cut - leaves the previous checkpoint usable. A checkpoint is intact when its manifest lists files that are
all there with their sizes and its trainer state loads; `--resume` from a damaged latest checkpoint falls
back to the newest intact one. A new run never starts in a directory that holds one unless asked to
replace it (`overwrite`), and every start first cleans up what dead writers left behind.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.atomic import recover_directory, remove_tree, write_directory, write_file
from lmforge.checkpoint import save_pretrained
from lmforge.errors import LmforgeError, warn
from lmforge.model import Transformer
from lmforge.tokenizer import tokenizer_files

STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "lmforge-checkpoint-v1"
# What a run directory holds; `overwrite` removes exactly these, nothing else.
RUN_FILES = ("run.json", "metrics.jsonl", "loss.png", "checkpoints")
_STEP = re.compile(r"step-(\d+)")


def rng_state() -> dict[str, Any]:
    """All RNG states, as tensors and plain Python values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: Transformer,
    trainer_state: dict[str, Any],
    tokenizer_dir: Path | None = None,
    keep_last: int = 2,
    save_model: Callable[[Transformer, Path], Any] | None = None,
) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, and prune all but the last `keep_last`.

    `save_model` writes the weights (default: the whole model in HF format; LoRA runs save only adapters).
    Checkpoints of later steps (left by a run that was resumed from an earlier one) are removed too: the
    directory holds one history."""
    root = run_dir / "checkpoints"

    def write(tmp: Path) -> None:
        (save_model or save_pretrained)(model, tmp)
        if tokenizer_dir is not None:
            for f in tokenizer_files(tokenizer_dir):
                shutil.copy2(f, tmp / f.name)
        torch.save(trainer_state, tmp / STATE_FILE)
        write_manifest(tmp, step)

    # Re-saving a step after a resume replaces that step's directory whole (nothing is carried over).
    final = write_directory(root / f"step-{step:08d}", write, owned=lambda name: True)
    write_file(root / "latest", final.name + "\n")
    steps = checkpoint_steps(root)
    kept = sorted(s for s in steps if s <= step)
    kept = kept[-keep_last:] if keep_last > 0 else kept
    for s, path in steps.items():
        if s != step and s not in kept:
            remove_tree(path)
    return final


def write_manifest(ckpt: Path, step: int) -> None:
    """List every file of the checkpoint with its size (the last file written before the rename)."""
    files = {
        p.relative_to(ckpt).as_posix(): p.stat().st_size
        for p in sorted(ckpt.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (ckpt / MANIFEST).write_text(json.dumps({"format": MANIFEST_FORMAT, "step": step, "files": files}, indent=1))


def checkpoint_steps(root: Path) -> dict[int, Path]:
    """step -> directory, for every checkpoint directory in `root` (complete or not)."""
    if not root.is_dir():
        return {}
    found = {}
    for p in root.iterdir():
        m = _STEP.fullmatch(p.name)
        if m and p.is_dir():
            found[int(m[1])] = p
    return dict(sorted(found.items()))


def checkpoint_damage(ckpt: Path, load_state: bool = True) -> str | None:
    """Why `ckpt` cannot be used (missing, no manifest, a file missing or of the wrong size, a trainer state
    that does not load), or None if it is intact."""
    if not _STEP.fullmatch(ckpt.name):
        return "not a checkpoint name"
    if not ckpt.is_dir():
        return "missing"
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
    except FileNotFoundError:
        # Written by lmforge before manifests (its atomic rename already kept partial saves out of place):
        # usable when its trainer state is there and loads.
        if not (ckpt / STATE_FILE).is_file():
            return f"no {MANIFEST} and no {STATE_FILE}"
        return _state_damage(ckpt) if load_state else None
    except (OSError, ValueError):
        return f"unreadable {MANIFEST}"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return f"unreadable {MANIFEST}"
    if STATE_FILE not in files:
        return f"{MANIFEST} lists no {STATE_FILE}"
    for name, size in files.items():
        try:
            actual = (ckpt / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} has {actual} bytes, the manifest says {size}"
    return _state_damage(ckpt) if load_state else None


def _state_damage(ckpt: Path) -> str | None:
    try:  # mmap: checks the archive and its records without reading every tensor into memory
        torch.load(ckpt / STATE_FILE, weights_only=True, mmap=True)
    except Exception as e:
        return f"{STATE_FILE} does not load: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return None


def _pointer_target(root: Path) -> Path | None:
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text(errors="replace").strip()
    return root / (name if _STEP.fullmatch(name) else f"<{name[:40]!r}>")  # `checkpoint_damage` says why


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `latest` points to, or None if the run has none."""
    root = run_dir / "checkpoints"
    ckpt = _pointer_target(root)
    if ckpt is None:
        return None
    damage = checkpoint_damage(ckpt, load_state=False)
    if damage is not None:
        raise LmforgeError(
            f"{root / 'latest'} points to {ckpt.name}, which is damaged ({damage}); pass one of the run's intact "
            "checkpoint directories instead, or continue the run with --resume (it falls back to the newest "
            "intact checkpoint)."
        )
    return ckpt


def recover_run(run_dir: Path) -> None:
    """Remove (or put back) what dead writers left in the run directory and its checkpoints."""
    recover_directory(run_dir)
    recover_directory(run_dir / "checkpoints")


def checkpoint_to_resume(
    run_dir: Path, resume: bool, overwrite: bool = False, sources: tuple[str | os.PathLike, ...] = ()
) -> Path | None:
    """The checkpoint a run continues from: with `resume` the latest intact one, else None for a new run.

    Never starts a new run over an existing one (that would mix two runs' checkpoints and metrics) unless
    `overwrite`, which first removes exactly the run's files (RUN_FILES), nor resumes from nothing (nor
    deletes `sources`, the paths the run reads from). With `resume`, a damaged latest checkpoint is passed
    over for the newest intact one, with a warning."""
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise LmforgeError("--resume continues the run in the output directory and --overwrite replaces it; pass one.")
    if run_dir.exists() and not run_dir.is_dir():
        raise LmforgeError(f"{run_dir} is a file; choose a directory for the run.")
    recover_run(run_dir)
    present = [name for name in RUN_FILES if (run_dir / name).exists()]
    if not resume:
        if present and not overwrite:
            latest = _pointer_target(run_dir / "checkpoints")
            what = f"latest checkpoint {latest.name}" if latest is not None else ", ".join(present)
            raise LmforgeError(
                f"{run_dir} already holds a run ({what}); pass --resume to continue it, --overwrite to replace "
                "it, or choose another --out."
            )
        for source in sources:
            inside = [name for name in present if Path(source).resolve().is_relative_to((run_dir / name).resolve())]
            if inside:
                raise LmforgeError(
                    f"{source} lies inside the run in {run_dir}, which --overwrite would delete first; copy it "
                    "elsewhere or choose another --out."
                )
        for name in present:
            path = run_dir / name
            if path.is_dir() and not path.is_symlink():
                remove_tree(path)
            else:
                path.unlink()
        return None
    return _newest_intact(run_dir, present)


def _newest_intact(run_dir: Path, present: list[str]) -> Path:
    root = run_dir / "checkpoints"
    latest = _pointer_target(root)
    damage = checkpoint_damage(latest) if latest is not None else None
    if latest is not None and damage is None:
        return latest
    for ckpt in reversed(list(checkpoint_steps(root).values())):
        if ckpt != latest and checkpoint_damage(ckpt) is None:
            if latest is not None:
                warn(
                    f"{root}: the latest checkpoint {latest.name} is damaged ({damage}); resuming from "
                    f"{ckpt.name}, the newest intact one."
                )
            return ckpt
    if latest is not None or checkpoint_steps(root):
        raise LmforgeError(
            f"--resume: {root} holds no intact checkpoint"
            + (f" (the latest, {latest.name}, is damaged: {damage})" if latest is not None else "")
            + "; pass --overwrite to start the run over."
        )
    if present:
        raise LmforgeError(
            f"--resume: {run_dir} has no checkpoint to resume from (the run stopped before its first save); "
            "pass --overwrite instead to start it over."
        )
    raise LmforgeError(f"--resume: {run_dir} has no checkpoint to resume from; drop --resume to start a new run.")


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    try:
        return torch.load(ckpt / STATE_FILE, weights_only=True)
    except Exception as e:
        raise LmforgeError(f"cannot read {ckpt / STATE_FILE} ({e}); resume from an earlier checkpoint.") from None


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A run directory stands for its latest checkpoint; any other path is returned as is."""
    p = Path(path)
    if (p / "checkpoints" / "latest").is_file():
        ckpt = latest_checkpoint(p)
        assert ckpt is not None
        return ckpt
    return p


def save_distributed(
    run_dir: Path,
    step: int,
    step_model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    tokenizer_dir: Path | None = None,
    keep_last: int = 2,
    save_model: Callable[[Transformer, Path], Any] | None = None,
) -> Path:
    """A checkpoint of a run split over ranks: every rank writes its shards of the model and optimizer (DCP,
    lmforge.parallel.dcp), rank 0 adds the whole model in HF format (so transformers reads what a sharded
    run trained), the tokenizer and the trainer state, and commits it all atomically. A collective.
    `save_model` (LoRA adapters) writes from the gathered model too."""
    from lmforge.parallel.dcp import committing, discard, save_sharded, staging_dir
    from lmforge.parallel.export import gather_model
    from lmforge.runtime import barrier, is_rank0

    root = run_dir / "checkpoints"
    staging = staging_dir(root, step)
    save_sharded(staging, step_model, optimizer)
    plain = gather_model(step_model)  # rank 0: the full weights (LoRA layers included)
    if is_rank0():
        assert plain is not None
        state = {k: v for k, v in trainer_state.items() if k != "optimizer"}  # it is in the shards
        writer = committing(staging, save_model or save_pretrained)
        try:
            save_checkpoint(run_dir, step, plain, state, tokenizer_dir, keep_last, writer)
        finally:
            discard(staging)
    barrier()
    return root / f"step-{step:08d}"


def resume_point(
    run_dir: Path, resume: bool, overwrite: bool, sources: tuple[str | os.PathLike, ...] = ()
) -> Path | None:
    """`checkpoint_to_resume` for every rank of a torchrun job: rank 0 decides (and may clear the directory or
    remove a dead writer's leftovers) and tells the others its answer, or its error. They must not look
    for themselves: by then rank 0 may have begun writing the new run, which would read as an existing one."""
    import torch.distributed as dist

    from lmforge.runtime import is_rank0

    if not (dist.is_available() and dist.is_initialized()):
        return checkpoint_to_resume(run_dir, resume, overwrite, sources=sources)
    outcome: list[Any] = [None]
    if is_rank0():
        try:
            ckpt = checkpoint_to_resume(run_dir, resume, overwrite, sources=sources)
            outcome = [("checkpoint", None if ckpt is None else str(ckpt))]
        except LmforgeError as e:
            outcome = [("error", str(e))]
    dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "error":
        raise LmforgeError(value)
    return None if value is None else Path(value)
