"""The recovery fine-tune after pruning: a short causal-LM run of the one training loop
(lmforge.train.loop.train) on prepared shards, with the pruned weights held at zero.

The zeros are held by a parametrization (torch.nn.utils.parametrize): while the masks are held, each pruned
projection's weight is computed as `original * mask`, so whatever the optimizer does to the parameter under
it (AdamW's update, weight decay, Muon's dense orthogonalised step) the weight the model uses stays exactly
zero where the mask is, and its gradient there is zero. Nothing in the loop knows about pruning. When the
run ends the masked weights are written back as plain parameters (`leave_parametrized=True`).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.quant.prune import PruneConfig


class KeepMask(nn.Module):
    """The parametrization weight -> weight * mask (mask: boolean [O, I], True where a weight is kept)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


@contextlib.contextmanager
def masks_held(model: Transformer, masks: dict[str, torch.Tensor]) -> Iterator[Transformer]:
    """Inside: the projections named in `masks` compute their weight as original * mask (module docstring).
    On exit (also on an error) the masked weights become plain parameters again."""
    modules = {name: model.get_submodule(name) for name in masks}
    for name, module in modules.items():
        parametrize.register_parametrization(module, "weight", KeepMask(masks[name].to(module.weight.device)))
    try:
        yield model
    finally:
        for module in modules.values():
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


@torch.no_grad()
def plain_copy(model: Transformer) -> Transformer:
    """The model as it computes, without parametrizations (for saving while masks are held): the masked
    weights are evaluated once; every other tensor is shared."""
    state = {}
    for key, value in model.state_dict().items():
        if ".parametrizations." in key:
            module_name, _, rest = key.partition(".parametrizations.")
            if rest != "weight.original":
                continue
            key, value = f"{module_name}.weight", model.get_submodule(module_name).weight.detach()
        state[key] = value
    copy = Transformer(model.config, device="meta")
    copy.load_state_dict(state, strict=True, assign=True)
    return copy


def recovery_config(cfg: PruneConfig):
    """The TrainConfig of the recovery run: a short warmup, cosine to 10%, no weight decay (a few hundred steps
    should restore what pruning removed, not shrink what stayed), no evaluation or checkpoints on the way."""
    from lmforge.train.config import TrainConfig

    steps = cfg.recover_steps
    return TrainConfig(
        steps=steps,
        batch_size=cfg.recover_batch_size,
        seq_len=cfg.recover_seq_len,
        lr=cfg.recover_lr,
        warmup_steps=max(1, steps // 10),
        schedule="cosine",
        min_lr_ratio=0.1,
        weight_decay=0.0,
        eval_every=0,
        save_every=0,
        keep_last=1,
        seed=cfg.seed,
        dtype=cfg.recover_dtype,
    )


def training_batches(model: Transformer, data_dir: str | Path, cfg: PruneConfig, seed: int | None = None):
    """Shuffled packed batches of the train split of `data_dir` (lmforge prepare), checked against the model."""
    from lmforge.data.loader import PackedLoader
    from lmforge.data.shards import TokenShards

    shards = TokenShards(data_dir, "train")
    if shards.vocab_size > model.config.vocab_size:
        raise LmforgeError(
            f"{data_dir} uses {shards.vocab_size} token ids but the model has a vocabulary of "
            f"{model.config.vocab_size}; prepare the data with this model's tokenizer."
        )
    if cfg.recover_seq_len > model.config.max_position_embeddings:
        raise LmforgeError(
            f"--recover-seq-len {cfg.recover_seq_len} exceeds the model's context of "
            f"{model.config.max_position_embeddings} tokens; lower it."
        )
    return PackedLoader(shards, cfg.recover_batch_size, cfg.recover_seq_len, seed=cfg.seed if seed is None else seed)


def recover(
    model: Transformer,
    masks: dict[str, torch.Tensor],
    data_dir: str | Path,
    cfg: PruneConfig,
    run_dir: str | Path | None = None,
    progress: bool = True,
):
    """Fine-tune `model` in place for cfg.recover_steps steps on the train split of `data_dir` with `masks`
    held (empty for structured pruning: a plain fine-tune). `run_dir` keeps the run (metrics.jsonl, the final
    checkpoint); by default it is a temporary directory, removed afterwards. Returns the loop's TrainResult."""
    from lmforge.train.loop import train

    if cfg.recover_steps <= 0:
        raise LmforgeError("recover() needs recover_steps > 0.")
    batches = training_batches(model, data_dir, cfg)
    train_cfg = recovery_config(cfg)
    with contextlib.ExitStack() as stack:
        if run_dir is None:
            run_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="lmforge-recover-"))
        with masks_held(model, masks):
            result = train(
                model,
                batches,
                train_cfg,
                Path(run_dir),
                progress=progress,
                save_model=_save_plain,
            )
    model.eval()
    with torch.no_grad():  # the parametrization guarantees it; a cheap check of the whole path
        for name, mask in masks.items():
            assert not model.get_submodule(name).weight[~mask].any(), f"{name}: pruned weights moved"
    return result


def _save_plain(model: Transformer, path: Path) -> None:
    from lmforge.checkpoint import save_pretrained

    save_pretrained(plain_copy(model), path)
