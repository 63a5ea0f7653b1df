"""torch.compile per block, in place (torchtitan's choice): the blocks are identical, so one compiled graph
serves them all, and the module tree and parameter names stay the model's own (torch.compile(model) would
prefix every name with `_orig_mod.`)."""

from __future__ import annotations

from lmforge.model import Transformer


def apply_compile(model: Transformer) -> None:
    """Compile each block of `model.layers` in place (after tensor parallelism and checkpointing, before
    FSDP/DDP). The embedding and the head stay eager: they run once per step."""
    for block in model.layers:
        block.compile()
