"""Activation checkpointing (Chen et al. 2016): keep each chosen block's input, recompute its inside in the
backward pass, trading about one extra forward for the memory of every activation inside the block.

Each chosen block gets PyTorch's composable `checkpoint` (torch.distributed._composable): non-reentrant
torch.utils.checkpoint run from the block's forward hooks. Unlike CheckpointWrapper (torchtitan's choice),
it leaves the module tree alone, so every parameter and module name stays the model's own
(`layers.0.attn.q_proj`, not `layers.0._checkpoint_wrapped_module.attn.q_proj`): LoRA's module names,
optimizer and checkpoint keys and HF exports are unaffected. It composes with DTensor (TP), FSDP2 and DDP.
"""

from __future__ import annotations

from torch.distributed._composable import checkpoint

from lmforge.errors import LmforgeError
from lmforge.model import Transformer

MODES = ("none", "full", "selective")
_MARK = "_lmforge_checkpointed"


def checkpointed_blocks(num_layers: int, mode: str, every: int = 2) -> list[int]:
    """Which block indices `mode` recomputes: all (full), every `every`-th counting from 1 (selective:
    blocks every-1, 2*every-1, ..., torchtitan's layer frequency), or none."""
    if mode not in MODES:
        raise LmforgeError(f"activation checkpointing must be one of {', '.join(MODES)}, got {mode!r}.")
    if every < 1:
        raise LmforgeError(f"checkpoint_every must be >= 1, got {every}.")
    if mode == "none":
        return []
    if mode == "full":
        return list(range(num_layers))
    return [i for i in range(num_layers) if (i + 1) % every == 0]


def apply_checkpointing(model: Transformer, mode: str = "full", every: int = 2) -> list[int]:
    """Checkpoint the chosen blocks of `model.layers` in place (see `checkpointed_blocks`); return their indices.

    Gradients are unchanged (the recomputation is exact: lmforge's blocks have no dropout). Apply after
    tensor parallelism and before compile and FSDP/DDP (lmforge.parallel.parallelize does)."""
    chosen = checkpointed_blocks(len(model.layers), mode, every)
    for i in chosen:
        block = model.layers[i]
        if getattr(block, _MARK, False):
            raise LmforgeError(f"block {i} is already checkpointed; apply activation checkpointing once.")
        checkpoint(block)
        setattr(block, _MARK, True)
    return chosen


def apply_activation_checkpointing(model: Transformer) -> None:
    """Every block recomputed: the old lmforge.train.loop entry point, as a proper module pass."""
    apply_checkpointing(model, "full")
