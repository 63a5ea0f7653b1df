"""PNG plots of results people would rather see than read (loss curves, comparisons).

matplotlib is an optional extra (`pip install "lmforge[plot]"`); without it plotting is skipped with a note.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.atomic import replace_file


def smoothed(values: list[float], beta: float = 0.9) -> np.ndarray:
    """Bias-corrected exponential moving average, for noisy per-step losses."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return np.asarray(out)


def _pyplot() -> Any | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_training(records: list[dict[str, Any]], out: Path, title: str = "training") -> Path | None:
    """Loss (raw and smoothed) and validation loss against step, with the learning rate below."""
    plt = _pyplot()
    if plt is None:
        return None
    train = [r for r in records if "loss" in r and np.isfinite(r["loss"])]
    val = [r for r in records if "val_loss" in r]
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    if train:
        steps = [r["step"] for r in train]
        losses = [r["loss"] for r in train]
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="train loss")
        ax.plot(steps, smoothed(losses), color="tab:blue", linewidth=1.5, label="train loss (smoothed)")
        ax_lr.plot(steps, [r["lr"] for r in train], color="tab:green")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", color="tab:red", label="validation loss")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    replace_file(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))  # never a half-written PNG
    plt.close(fig)
    return out


def plot_bars(values: dict[str, float], out: Path, ylabel: str, title: str) -> Path | None:
    """A labelled bar chart (e.g. bits per byte of the model against compressors)."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(values)
    bars = ax.bar(names, [values[n] for n in names], color=["tab:blue"] + ["tab:gray"] * (len(names) - 1))
    for bar, name in zip(bars, names, strict=True):
        ax.annotate(
            f"{values[name]:.3f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom"
        )
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    replace_file(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))  # never a half-written PNG
    plt.close(fig)
    return out
