"""Run checkpoints: an HF-format model directory plus everything needed to resume exactly.

    <run>/checkpoints/step-00000100/   config.json, model.safetensors, tokenizer files, trainer_state.pt
    <run>/checkpoints/latest           the name of the newest complete checkpoint

A checkpoint is assembled in a temporary directory, renamed into place, and only then does `latest`
move to it (itself replaced atomically), so a crash at any point leaves the previous checkpoint usable.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.atomic import write_directory
from lmforge.checkpoint import save_pretrained
from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.tokenizer import tokenizer_files

STATE_FILE = "trainer_state.pt"


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
    save_model: Callable[[Transformer, Path], Any] = save_pretrained,
) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, and prune all but the last `keep_last`.

    `save_model` writes the weights (default: the whole model in HF format; LoRA runs save only adapters)."""
    root = run_dir / "checkpoints"

    def write(tmp: Path) -> None:
        save_model(model, tmp)
        if tokenizer_dir is not None:
            for f in tokenizer_files(tokenizer_dir):
                shutil.copy2(f, tmp / f.name)
        torch.save(trainer_state, tmp / STATE_FILE)

    # Re-saving a step after a resume replaces that step's directory whole (nothing is carried over).
    final = write_directory(root / f"step-{step:08d}", write, owned=lambda name: True)
    pointer = root / ".latest.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, root / "latest")
    complete = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in complete[:-keep_last] if keep_last > 0 else []:
        if old.name != final.name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `latest` points to, or None if the run has none."""
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    ckpt = pointer.parent / pointer.read_text().strip()
    if not (ckpt / STATE_FILE).is_file():
        raise LmforgeError(f"{pointer} points to {ckpt.name}, which is incomplete; delete the pointer to start over.")
    return ckpt


def checkpoint_to_resume(run_dir: Path, resume: bool) -> Path | None:
    """The checkpoint a run continues from: the latest one with `resume`, None for a new run. Never starts a
    new run over an existing one (that would mix two runs' checkpoints), nor resumes from nothing."""
    ckpt = latest_checkpoint(run_dir) if run_dir.exists() else None
    if resume and ckpt is None:
        raise LmforgeError(f"--resume: {run_dir} has no checkpoint to resume from; drop --resume to start a new run.")
    if not resume and ckpt is not None:
        raise LmforgeError(
            f"{run_dir} already holds a run (latest checkpoint {ckpt.name}); pass --resume to continue it "
            "or choose another --out."
        )
    return ckpt


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
