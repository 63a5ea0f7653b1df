"""Quantized layers that multiply the same input share one kernel call: q/k/v, and gate/up.

A decode step multiplies a single row by each weight; at that size a product's fixed costs (casting the
input, handing the kernel its threads, the kernel's own set-up) are a large part of its time. Attention
feeds one tensor to q_proj, k_proj and v_proj, and the MLP one to gate_proj and up_proj, so the first of
them to run computes the product of the stacked weight ([N_q + N_k + N_v, K]) and the others take their
columns of it: 4 kernel calls per block instead of 7, and one bias add (q/k/v biases: Qwen) instead of 3.
Each output element is the same dot product and sum as before, so results are bit-identical (tested).

The stacked weight is the only copy: each layer's buffers (and bias) become row slices of it, so a checkpoint still
holds one tensor per layer and the memory does not grow. The model file is untouched; it is enough that it
passes the same tensor object to the siblings, which every forward here does. A layer called with another
input than its siblings' computes the group's product again (correct, only slower).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lmforge.quant.layers import QuantLinear

SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # attributes that read one input


class SharedInput:
    """One product for several quantized layers of the same kind and input size (see the module docstring)."""

    def __init__(self, layers: Sequence[QuantLinear]) -> None:
        self.layers = list(layers)
        self.sizes = [m.out_features for m in self.layers]
        self.stacked: QuantLinear | None = None
        self.source: tuple[int, ...] = ()  # ids of the layers' buffers the stacked layer was made of
        self.input: torch.Tensor | None = None  # held while some layer has not taken its columns yet
        self.outputs: dict[int, torch.Tensor] = {}  # id(layer) -> its columns of the last product
        # In a compiled step W8A8 layers multiply alone: FBGEMM is slower on the stacked weights (199 us for
        # gate+up against 2 x 88 us on the qwen2.5-0.5b shape), which eagerly the saved calls make up for and
        # compiled they do not (28.6 against 34.4 ms per token; int8 and int4 gain ~1 ms from sharing there).
        self.alone_when_compiled = layers[0].act_dtype == torch.int8

    def product(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        """What `layer.product(x.reshape(-1, K))` returns, computed once for all the layers per input."""
        if torch.compiler.is_compiling():
            return self.compiled_product(layer, x)
        if self.input is not x or id(layer) not in self.outputs:
            stacked = self.stack()
            stacked.gemv = layer.gemv  # the decode threads, while a ParallelGemv lends them
            y = stacked.product(x.reshape(-1, stacked.in_features))  # [M, sum(N)]
            if y.dtype != x.dtype:
                y = y.to(x.dtype)  # one cast for all
            if stacked.bias is not None:  # and one bias add
                y = y + (stacked.bias if stacked.bias.dtype == x.dtype else stacked.bias.to(x.dtype))
            self.outputs = {id(m): part for m, part in zip(self.layers, y.split(self.sizes, dim=1), strict=True)}
            self.input = x
        out = self.outputs.pop(id(layer))
        if not self.outputs:
            self.input = None
        return out

    def prepare_for_compile(self) -> None:
        """Stack now, and number the layers: a compiled graph can neither rebuild the stack nor look layers up
        by id."""
        stacked = self.stack()
        stacked.prepare_for_compile()
        for i, m in enumerate(self.layers):
            m.share_index = i

    def compiled_product(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        """`product` inside a compiled graph (lmforge.generate.compiled): the first layer multiplies by the
        stacked weight and the others take their columns, when they follow it on the same input (the model's
        order); otherwise a layer multiplies alone."""
        i = layer.share_index
        if self.alone_when_compiled or i == 0 or self.input is not x or self.outputs.get(i) is None:
            if i != 0 or self.alone_when_compiled:
                return layer.product(x.reshape(-1, layer.in_features)).to(x.dtype) + _bias(layer, x.dtype)
            y = self.stacked.product(x.reshape(-1, self.stacked.in_features)).to(x.dtype)
            y = y + _bias(self.stacked, x.dtype)
            self.outputs = dict(enumerate(y.split(self.sizes, dim=1)))
            self.input = x
        out = self.outputs.pop(i)
        if i == len(self.layers) - 1:
            self.outputs, self.input = {}, None  # nothing of the graph's is left on this object
        return out

    def stack(self) -> QuantLinear:
        """The stacked layer; built on first use, and again when a loader replaced a layer's tensors."""
        if self.stacked is None or self._buffer_ids() != self.source:
            with torch.inference_mode(False):  # normal tensors, so that the layers' views take in-place loads
                self._stack()
        return self.stacked

    def _stack(self) -> None:
        first = self.layers[0]
        stacked = first.empty_like(sum(self.sizes))
        for name, _ in first.named_buffers(recurse=False):
            setattr(stacked, name, torch.cat([getattr(m, name) for m in self.layers]))
        if any(m.bias is not None for m in self.layers):  # a layer without one adds zeros
            biases = [
                torch.zeros(m.out_features, device=first.qweight.device) if m.bias is None else m.bias.detach()
                for m in self.layers
            ]
            stacked.bias = nn.Parameter(torch.cat(biases), requires_grad=False)
        start = 0
        for m in self.layers:  # the layers now read (and save) their rows of the stacked tensors
            rows = slice(start, start + m.out_features)
            for name, buffer in stacked.named_buffers(recurse=False):
                setattr(m, name, buffer[rows])
            if m.bias is not None:
                m.bias = nn.Parameter(stacked.bias[rows], requires_grad=False)
            start += m.out_features
        self.stacked, self.source = stacked, self._buffer_ids()

    def _buffer_ids(self) -> tuple[int, ...]:
        # checked on every product: the _buffers dicts directly, not named_buffers' generators (10x slower)
        return tuple(id(b) for m in self.layers for b in (*m._buffers.values(), m._parameters.get("bias")))


def _bias(layer: QuantLinear, dtype: torch.dtype) -> torch.Tensor | float:
    return 0.0 if layer.bias is None else layer.bias.to(dtype)


def share_inputs(model: nn.Module) -> None:
    """Group the quantized sibling layers of every block (SIBLINGS)."""
    for module in model.modules():
        for names in SIBLINGS:
            layers = [getattr(module, name, None) for name in names]
            if all(isinstance(m, QuantLinear) for m in layers) and _alike(layers):
                group = SharedInput(layers)
                for m in layers:
                    m.shared = group


def _alike(layers: list[QuantLinear]) -> bool:
    """One kernel can compute them all: same class, input size, compute dtype and group size."""
    first = layers[0]
    return all(
        type(m) is type(first)
        and m.in_features == first.in_features
        and m.act_dtype == first.act_dtype
        and getattr(m, "group_size", None) == getattr(first, "group_size", None)
        for m in layers
    )
