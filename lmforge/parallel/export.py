"""Whole weights out of a parallelized model, for HF export on rank 0 (lmforge.save_pretrained)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from lmforge.model import Transformer
from lmforge.quant.quantize import quantize_as
from lmforge.runtime import is_rank0


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) state dict under its own names, as CPU tensors on rank 0 and an empty
    dict elsewhere. Works on what parallelize returned or on the model itself (FSDP, TP, fsdp+tp, DDP,
    checkpoint wrappers, compiled blocks). A collective: every rank must call it."""
    if not torch.distributed.is_initialized():
        return {k: v.detach().cpu() for k, v in _unwrap(module).state_dict().items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module, options=options)


def gather_model(module: nn.Module) -> Transformer | None:
    """On rank 0, a plain single-process Transformer (CPU, fp32 or the stored dtype) holding the full weights,
    ready for save_pretrained (or, with LoRA layers, for save_adapter); None on the other ranks. A
    collective: every rank must call it."""
    state = full_state_dict(module)
    if not is_rank0():
        return None
    source = _unwrap(module)
    plain = Transformer(source.config, device="meta")
    quantization = getattr(source, "quantization_config", None)
    if quantization is not None:  # a quantized base (QLoRA): the same empty quantized layers, to be filled
        quantize_as(plain, quantization, "the trained model")
    # Layers added from outside the model (LoRA) say how to rebuild themselves around the plain layer.
    for name, layer in source.named_modules():
        if hasattr(layer, "replicate_onto"):
            parent, _, attr = name.rpartition(".")
            setattr(plain.get_submodule(parent), attr, layer.replicate_onto(plain.get_submodule(name)))
    plain.load_state_dict(state, strict=True, assign=True)
    return plain


def _unwrap(module: nn.Module) -> Transformer:
    inner = getattr(module, "module", module)  # DistributedDataParallel
    assert isinstance(inner, Transformer), type(inner)
    return inner
