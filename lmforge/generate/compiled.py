"""A decode step compiled with torch.compile (gpt-fast's recipe), for one static batch.

At one token per step a small model's decode step is mostly overhead around the weight products: on the
qwen2.5-0.5b shape about 290 module calls and 1,600 small aten ops per token (norms, RoPE, casts, residual
adds), 6-20 ms of a 25-60 ms step on the CPUs measured (benchmarks/RESULTS.md). Inductor fuses those ops
into a few C++ kernels and replaces the module calls by one generated function, leaving the products to
the same aten kernels as before.

Compiling needs fixed shapes, or it would compile again at every new cache length: `FixedCache` keeps one
[B, K, S_max, D] buffer per layer, writes each step's keys at the slots given as a tensor, and attention
reads all S_max slots under a mask that hides the unwritten ones (the masked slots get zero weight, so
the result is the same attention over the written ones, up to the order of the kernels' sums). Prefill
runs eagerly on the same cache; only the one-token step is compiled.

Use: `decoder = CompiledDecoder(model, batch_size, max_length)`, then `decoder.prefill(ids)` and
`decoder.step(tokens)`, each returning the last position's logits [B, V]. The first step compiles (tens of
seconds on a 2-core CPU, cached by inductor on disk for later processes). A decoder is built for the model
as it is: after loading other weights into it or changing its layers, build a new one.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from types import FunctionType, MethodType

import torch

from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.quant.layers import QuantLinear

_copies = itertools.count()


def _own_copy(method: Callable) -> Callable:
    """The bound method with a code object of its own. torch.compile keeps the compiled versions of a code
    object together, at most 8 (recompile_limit), and with fullgraph fails past that: every decoder (its
    model, batch, length) would be one more version of the same method."""
    fn = method.__func__
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_copies)}")
    copy = FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    return MethodType(copy, method.__self__)


class FixedCache:
    """A KV cache whose every shape is fixed: see the module docstring. `slots` [T] says where this
    forward's keys go (set by the caller before each forward)."""

    def __init__(self, model: Transformer, batch_size: int, max_length: int) -> None:
        c = model.config
        p = next(model.parameters())
        dtype = p.dtype if p.is_floating_point() else torch.float32
        shape = (batch_size, c.num_kv_heads, max_length, c.head_dim)  # [B, K, S_max, D]
        self.k = [torch.zeros(shape, dtype=dtype, device=p.device) for _ in range(c.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=p.device) for _ in range(c.num_layers)]
        self.max_length = max_length
        self.slots = torch.zeros(1, dtype=torch.long, device=p.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, K, T, D] at `slots`; return all S_max slots."""
        self.k[layer].index_copy_(2, self.slots, k)
        self.v[layer].index_copy_(2, self.slots, v)
        return self.k[layer], self.v[layer]


class CompiledDecoder:
    """Prefill eagerly, then decode one token per row per step through a compiled forward."""

    def __init__(self, model: Transformer, batch_size: int, max_length: int) -> None:
        if max_length > model.config.max_position_embeddings:
            raise LmforgeError(
                f"{max_length} tokens exceed the model's context of {model.config.max_position_embeddings}; "
                "generate fewer tokens."
            )
        self.model = model
        self.cache = FixedCache(model, batch_size, max_length)
        self.length = 0
        self.compiled = False
        self.slot_ids = torch.arange(max_length, device=self.cache.slots.device)
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.prepare_for_compile()
                if m.shared is not None:
                    m.shared.prepare_for_compile()
        # fullgraph: a graph break would bring back the overhead this exists to remove; fail instead.
        self._step = torch.compile(_own_copy(self._forward_one), fullgraph=True, dynamic=False)

    def _forward_one(self, tokens: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """tokens [B, 1] at `position` [1] -> logits [B, V] (what is compiled)."""
        self.cache.slots = position
        mask = (self.slot_ids <= position)[None, None, None, :]  # [1, 1, 1, S_max]: the written slots
        return self.model(tokens, position, mask, self.cache)[:, -1]

    def reset(self) -> None:
        """Start again from an empty context (the old keys stay, masked out until overwritten)."""
        self.length = 0

    @torch.inference_mode()  # lighter than no_grad: no autograd bookkeeping at all
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] from an empty cache -> logits [B, V] after the last one."""
        T = ids.shape[1]
        self._check(T)
        self.cache.slots = self.slot_ids[:T]
        causal = self.slot_ids[None, :] <= self.slot_ids[:T, None]  # [T, S_max]
        logits = self.model(ids, self.slot_ids[:T], causal[None, None], self.cache, logits_to_keep=1)
        self.length = T
        return logits[:, -1]

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B] (or [B, 1]) after the cached ones -> logits [B, V] for the next position."""
        self._check(1)
        args = (tokens.view(-1, 1), self.slot_ids[self.length : self.length + 1])
        logits = None
        if self.compiled:
            # Checking every guard (the model's modules and tensors) costs ~0.8 ms a step on the qwen2.5-0.5b
            # shape; this stance checks only what tells compiled versions apart, and raises where none fits.
            try:
                with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                    logits = self._step(*args)
            except RuntimeError as e:
                if "Recompilation" not in str(e):
                    raise
        if logits is None:  # the first step, or something the graph depends on changed (e.g. a profiler)
            logits = self._step(*args)
            self.compiled = True
        self.length += 1
        return logits

    def _check(self, new: int) -> None:
        if self.length + new > self.cache.max_length:
            raise LmforgeError(
                f"the compiled decoder's cache holds {self.cache.max_length} tokens and this step needs "
                f"{self.length + new}; make it longer."
            )
