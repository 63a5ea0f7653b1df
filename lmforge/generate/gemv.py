"""Matrix-vector products split across threads, for decoding large fp32 models on CPU.

One decode step multiplies each weight matrix by a handful of vectors. The fp32 path of PyTorch's CPU
BLAS (MKL) runs those products on ONE thread, which reaches about 60% of this machine's memory bandwidth
(benchmarks/RESULTS.md). Splitting the rows of the weight across `torch.get_num_threads()` threads (the
caller plus helpers; PyTorch releases the GIL inside the kernels) reaches the bandwidth ceiling. Every
output element is still the same dot product, so results are bit-identical. bf16 goes through oneDNN,
which already uses every thread, and is left alone.

Decode steps run on one torch thread (an OpenMP team for the many small ops around the products costs more
than it brings). The quantized layers' kernels (lmforge.quant.layers) do split their own rows over
OpenMP threads, and much more cheaply than a hand-off to a Python thread per product (measured: int4 decode
30 vs 50 ms per token on the qwen2.5-0.5b shape), so instead of a split they get the threads back for the
length of their product (`kernel_threads`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from collections.abc import Callable, Iterator
from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 16  # inputs with more rows (prefill, training) are real matrix products: leave them to BLAS
MIN_WEIGHT = 1 << 20  # elements; below this a thread hand-off costs more than it saves


class ParallelGemv:
    """Context manager: inside it, the model's large fp32 linear layers split small-batch products and its
    quantized layers run their products on every thread."""

    def __init__(self, model: nn.Module, threads: int | None = None) -> None:
        self.model = model
        self.threads = threads or torch.get_num_threads()
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.patched: list[tuple[Any, str]] = []

    def __enter__(self) -> ParallelGemv:
        """Install, and hand torch's intra-op threads to the helpers and kernels until exit."""
        self.install()
        self.saved_threads = torch.get_num_threads()
        if self.patched:
            # Our threads replace PyTorch's intra-op pool while decoding: its OpenMP workers would otherwise
            # spin on the cores our helpers need. At one token per step the other ops are too small to miss them.
            torch.set_num_threads(1)
        return self

    def install(self) -> ParallelGemv:
        """Route the eligible layers' small products through the helper threads (until `remove`)."""
        if self.threads < 2 or self.patched:
            return self
        # Exactly nn.Linear: subclasses (LoRA layers) compute more than the product and keep their forward.
        linears = [m for m in self.model.modules() if type(m) is nn.Linear and _eligible(m.weight)]
        # Quantized layers (lmforge.quant.layers) keep their kernels and ask this object for threads.
        quantized = [m for m in self.model.modules() if hasattr(type(m), "gemv")]
        head_weight = getattr(self.model, "output_weight", None)  # None too when the head is quantized
        head = head_weight is not None and _eligible(head_weight)
        if linears or head:
            self.pool = concurrent.futures.ThreadPoolExecutor(self.threads - 1, thread_name_prefix="lmforge-gemv")
        for m in linears:
            m.forward = MethodType(_linear_forward(self), m)
            self.patched.append((m, "forward"))
        for m in quantized:
            m.gemv = self
            self.patched.append((m, "gemv"))
        if head:

            def head(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
                return self.linear(model.norm(x), model.output_weight, None)

            self.model.head = MethodType(head, self.model)
            self.patched.append((self.model, "head"))
        return self

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.saved_threads)
        self.remove()

    def remove(self) -> None:
        for obj, name in self.patched:
            delattr(obj, name)  # the class's method shows through again
        self.patched.clear()
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """F.linear, with a small-batch product's rows split over the threads (bit-identical)."""
        x2 = x.reshape(-1, x.shape[-1])  # [M, in]
        rows, n_out = x2.shape[0], weight.shape[0]
        if self.pool is None or rows > MAX_ROWS or torch.is_grad_enabled():  # prefill, training: BLAS's own,
            with self.kernel_threads():  # on every thread (MKL's result may depend on its thread count: AMX Xeon)
                return F.linear(x, weight, bias)
        out = torch.empty(rows, n_out, dtype=x2.dtype, device=x2.device)  # [M, out]
        bounds = [n_out * i // self.threads for i in range(self.threads)] + [n_out]
        parts = [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
        jobs = [self.pool.submit(_rows_into, x2, weight, a, b, out[:, a:b]) for a, b in parts[1:]]
        _rows_into(x2, weight, *parts[0], out[:, parts[0][0] : parts[0][1]])  # this thread's share
        for job in jobs:
            job.result()
        if bias is not None:
            out += bias
        return out.view(*x.shape[:-1], n_out)

    @contextlib.contextmanager
    def kernel_threads(self) -> Iterator[None]:
        """Every thread for one product of a kernel that splits its own work (the quantized layers')."""
        inside = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(inside)


def _eligible(weight: torch.Tensor) -> bool:
    return weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.numel() >= MIN_WEIGHT


def _rows_into(x2: torch.Tensor, weight: torch.Tensor, a: int, b: int, out: torch.Tensor) -> None:
    with torch.inference_mode():  # grad/inference mode is per thread: the helper needs it set too
        torch.mm(x2, weight[a:b].t(), out=out)


def _linear_forward(ctx: ParallelGemv) -> Callable[[nn.Linear, torch.Tensor], torch.Tensor]:
    def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return ctx.linear(x, self.weight, self.bias)

    return forward
