"""Matrix-vector products split across threads, for decoding large fp32 models on CPU.

One decode step multiplies each weight matrix by a handful of vectors. The fp32 path of PyTorch's CPU
BLAS (MKL) runs those products on ONE thread, which reaches about 60% of this machine's memory bandwidth
(benchmarks/RESULTS.md). Splitting the rows of the weight across `torch.get_num_threads()` threads (the
caller plus helpers; PyTorch releases the GIL inside the kernels) reaches the bandwidth ceiling. Quantized
layers (lmforge.quant.layers) run their own kernels on the same split. Every
output element is still the same dot product, so results are bit-identical. bf16 goes through oneDNN,
which already uses every thread, and is left alone.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 16  # inputs with more rows (prefill, training) are real matrix products: leave them to BLAS
MIN_WEIGHT = 1 << 20  # elements; below this a thread hand-off costs more than it saves


class ParallelGemv:
    """Context manager: inside it, the model's large fp32 linear layers split small-batch products."""

    def __init__(self, model: nn.Module, threads: int | None = None) -> None:
        self.model = model
        self.threads = threads or torch.get_num_threads()
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.patched: list[tuple[Any, str]] = []

    def __enter__(self) -> ParallelGemv:
        """Install, and hand torch's intra-op threads to the helpers until exit."""
        self.install()
        if self.pool is not None:
            # Our threads replace PyTorch's intra-op pool while decoding: its OpenMP workers would otherwise
            # spin on the cores our helpers need. At one token per step the other ops are too small to miss them.
            self.saved_threads = torch.get_num_threads()
            torch.set_num_threads(1)
        return self

    def install(self) -> ParallelGemv:
        """Route the eligible layers' small products through the helper threads (until `remove`)."""
        if self.threads < 2 or self.patched:
            return self
        # Exactly nn.Linear: subclasses (LoRA layers) compute more than the product and keep their forward.
        linears = [m for m in self.model.modules() if type(m) is nn.Linear and _eligible(m.weight)]
        # Quantized layers (lmforge.quant.layers) keep their kernels and hand this object their row split.
        quantized = [m for m in self.model.modules() if _splits_rows(m)]
        head_weight = getattr(self.model, "output_weight", None)  # None too when the head is quantized
        if not linears and not quantized and (head_weight is None or not _eligible(head_weight)):
            return self
        self.pool = concurrent.futures.ThreadPoolExecutor(self.threads - 1, thread_name_prefix="lmforge-gemv")
        for m in linears:
            m.forward = MethodType(_linear_forward(self), m)
            self.patched.append((m, "forward"))
        for m in quantized:
            m.gemv = self
            self.patched.append((m, "gemv"))
        if head_weight is not None and _eligible(head_weight):

            def head(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
                return self.linear(model.norm(x), model.output_weight, None)

            self.model.head = MethodType(head, self.model)
            self.patched.append((self.model, "head"))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
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
        x2 = x.reshape(-1, x.shape[-1])  # [M, in]
        out = self.split(x2, weight.shape[0], lambda x2, a, b, o: torch.mm(x2, weight[a:b].t(), out=o))
        if out is None:
            return F.linear(x, weight, bias)
        if bias is not None:
            out += bias
        return out.view(*x.shape[:-1], weight.shape[0])

    def split(
        self,
        x2: torch.Tensor,
        n_out: int,
        rows_into: Callable[[torch.Tensor, int, int, torch.Tensor], None],
        align: int = 1,
        out_dtype: torch.dtype | None = None,
    ) -> torch.Tensor | None:
        """x2 [M, in] times a weight of `n_out` rows, the rows split over the threads: `rows_into(x2, a, b, out)`
        writes output columns a..b (the split points are multiples of `align`; the output is `out_dtype`,
        default x2's). None when the product is not
        small enough to gain (prefill, training): the caller computes it whole."""
        rows = x2.shape[0]
        if self.pool is None or rows > MAX_ROWS or torch.is_grad_enabled():
            return None
        out = torch.empty(rows, n_out, dtype=out_dtype or x2.dtype, device=x2.device)  # [M, out]
        bounds = [n_out * i // self.threads // align * align for i in range(self.threads)] + [n_out]
        parts = [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
        jobs = [self.pool.submit(_in_inference, rows_into, x2, a, b, out[:, a:b]) for a, b in parts[1:]]
        a, b = parts[0]
        _in_inference(rows_into, x2, a, b, out[:, a:b])  # this thread's share
        for job in jobs:
            job.result()
        return out


def _eligible(weight: torch.Tensor) -> bool:
    return weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.numel() >= MIN_WEIGHT


def _splits_rows(m: nn.Module) -> bool:
    return hasattr(m, "rows_into") and hasattr(type(m), "gemv") and m.in_features * m.out_features >= MIN_WEIGHT


def _in_inference(rows_into: Callable[..., None], *args: Any) -> None:
    with torch.inference_mode():  # grad/inference mode is per thread: the helper needs it set too
        rows_into(*args)


def _linear_forward(ctx: ParallelGemv) -> Callable[[nn.Linear, torch.Tensor], torch.Tensor]:
    def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return ctx.linear(x, self.weight, self.bias)

    return forward
