"""Weight-only quantized linear layers: int8 per output channel, int4 per group of inputs.

Decoding is bound by the bytes of weights read per token; storing them in 8 or 4 bits reads 4x or 8x
fewer than fp32. Both layers run torch's own CPU kernels (aten `_weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu`, gpt-fast's choice), which dequantize inside the product. Those kernels are
fast with bf16 activations and slow with fp32 ones on every CPU measured here (benchmarks/RESULTS.md), so
each layer computes in an `act_dtype` chosen by measurement (lmforge.quant.quantize) and returns its
output in the input's dtype. Elsewhere (CUDA, or a kernel refusing a shape) they dequantize and use F.linear.

Letters: M rows of input (tokens), K input features, N output features, G groups of `group_size` inputs.

`act_dtype=torch.int8` (int8 layers only) also quantizes each input row to 7 bits on the fly and multiplies
in integers: W8A8, what llama.cpp's q8_0 products do. A row is quantized asymmetrically, its min..max (zero
included) in 127 steps: FBGEMM's dynamic quantization with `reduce_range`, which keeps its AVX2 kernel's
16-bit pair sums from saturating. Inputs of a few rows (decode steps; how many is timed: `fbgemm_row_limit`)
go row by row through that kernel (torch.ops.quantized.linear_dynamic: 2.4x faster than torch._int_mm on
one thread on an AVX-512 VNNI CPU, near the memory bandwidth on two); more rows (prefill), or a torch
without it, take the same quantization computed here and an exact int32 product (lmforge.quant.int8_product:
torch._int_mm, or fp32 GEMMs where those are faster). Both are per row; a row's numbers depend on the batch
only through which of the two runs (a rounding tie may then land one step apart).

Gradients flow to the input (not to the frozen quantized weight), so LoRA adapters before and after a
quantized layer train (QLoRA, Dettmers et al. 2023, with int4/int8 in place of NF4).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.quant.int8_product import fbgemm_pack, fbgemm_row_limit, fbgemm_rows, int8_product

INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernel accepts
# handle -> (the W8A8 layer, its FBGEMM weight, the FBGEMM row limit), for the lmforge::w8a8_product op below
_W8A8: dict[int, tuple[weakref.ref, Any, int]] = {}


def w8a8_handle(layer: Int8Linear) -> int:
    """A number that names a W8A8 layer to the lmforge::w8a8_product op (ops cannot take modules); its
    FBGEMM weight is packed now, so that the op runs without checks (a compiled step calls it 100+ times)."""
    if id(layer) not in _W8A8:
        weakref.finalize(layer, _W8A8.pop, id(layer), None)  # the packed copy goes with the layer
    _W8A8[id(layer)] = (weakref.ref(layer), layer.w8a8("packed"), fbgemm_row_limit())
    return id(layer)


def _w8a8_product(x2: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    layer, packed, limit = _W8A8[handle]
    if x2.shape[0] == 1 and packed is not None:  # a decode step
        return torch.ops.quantized.linear_dynamic(x2, packed, True)
    if x2.shape[0] <= limit and packed is not None:
        return fbgemm_rows(x2, packed)
    return layer().product(x2)


# W8A8's product as one op a compiled graph calls without tracing it: FBGEMM's packed weight is a script object
# that torch.compile cannot take. Defined with torch.library.Library rather than custom_op, whose Python
# wrapper costs more per call (measured: 19 against 17 us for a 64x64 product, 15.6 us called directly).
_LIB = torch.library.Library("lmforge", "DEF")
_LIB.define("w8a8_product(Tensor x2, int handle, int out_features) -> Tensor")
_LIB.impl("w8a8_product", _w8a8_product, "CPU")
_LIB.impl("w8a8_product", lambda x2, handle, n: x2.new_empty(x2.shape[0], n, dtype=torch.float32), "Meta")


class _WeightOnlyMatmul(torch.autograd.Function):
    """y = x W^T with W quantized: the kernel forward, dx = dy W backward (W dequantized for the backward)."""

    @staticmethod
    def forward(ctx: Any, x2: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
        ctx.layer = layer
        return layer.product(x2)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        w = ctx.layer.dequantize().to(grad.dtype)  # [N, K]
        return grad @ w, None  # [M, K]


class QuantLinear(nn.Module):
    """What the int8 and int4 layers share: shapes, the bias, the compute dtype, the decode threads."""

    bits: int = 0
    gemv: Any = None  # a ParallelGemv while one is installed (lmforge.generate.gemv): it lends the threads
    shared: Any = None  # a SharedInput when siblings read the same input (lmforge.quant.shared_input)

    def __init__(self, in_features: int, out_features: int, bias: bool, act_dtype: torch.dtype, device: Any) -> None:
        super().__init__()
        self.in_features, self.out_features, self.act_dtype = in_features, out_features, act_dtype
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            y = _WeightOnlyMatmul.apply(x.reshape(-1, self.in_features), self)
        elif self.shared is not None and x.device.type == "cpu":  # the group adds the biases
            return self.shared.product(self, x).view(*x.shape[:-1], self.out_features)
        else:
            y = self.product(x.reshape(-1, self.in_features))  # [M, N]
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        bias = self.bias
        if bias is not None:
            y = y + (bias if bias.dtype == x.dtype else bias.to(x.dtype))
        return y.view(*x.shape[:-1], self.out_features)

    def product(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [M, K] @ W^T -> [M, N]: the kernel on CPU (on every thread while a ParallelGemv is installed:
        decode steps otherwise run on one), a dequantized F.linear elsewhere."""
        if x2.device.type != "cpu":
            return F.linear(x2.to(self.compute_dtype), self.dequantize().to(self.compute_dtype))
        if torch.compiler.is_compiling():
            return self.compiled_product(x2)
        xa, finish = self.activations(x2)
        if self.gemv is not None:
            with self.gemv.kernel_threads():
                y = self.kernel(xa)
        else:
            y = self.kernel(xa)
        return y if finish is None else finish(y)

    def prepare_for_compile(self) -> None:
        """Build what `compiled_product` reads (a compiled graph cannot check or rebuild derived tensors)."""

    def compiled_product(self, x2: torch.Tensor) -> torch.Tensor:
        """`product` inside a torch.compile'd graph (lmforge.generate.compiled): the kernel alone, on the
        graph's threads, from tensors `prepare_for_compile` built."""
        raise NotImplementedError

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float32 if self.act_dtype == torch.int8 else self.act_dtype

    def activations(self, x2: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor] | None]:
        """What the kernel multiplies, and what turns the kernel's result into the output (None: nothing)."""
        return x2.to(self.act_dtype), None

    def kernel(self, xa: torch.Tensor) -> torch.Tensor:
        """The CPU kernel's product of the activations `activations` made, [M, N] in `compute_dtype`."""
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The weight [N, K] in fp32."""
        raise NotImplementedError

    def empty_like(self, out_features: int) -> QuantLinear:
        """A layer of the same kind and settings with `out_features` outputs, no bias, on the meta device."""
        raise NotImplementedError

    def source(self, *names: str) -> tuple[int, ...]:
        """What derived tensors (a kernel's layout of the weight) were built from: the buffers' identities and
        version counters, so that loading new tensors (assign) or new values in place (copy_) rebuilds them."""
        buffers = self._buffers  # (not the attributes: Module.__getattr__ costs more than the product's set-up)
        stamps = []
        for name in names:
            t = buffers[name]
            stamps += (id(t), -1 if t.is_inference() else t._version)  # (inference tensors keep no counter)
        return tuple(stamps)

    def weight_bytes(self) -> int:
        """Bytes a product reads: the quantized weight and its scales (what decode speed depends on)."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def extra_repr(self) -> str:
        act = str(self.act_dtype).removeprefix("torch.")
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, act={act}"


class Int8Linear(QuantLinear):
    """W [N, K] ~ qweight (int8) * scales [N] (symmetric, absmax / 127 per output channel)."""

    bits = 8

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        act_dtype: torch.dtype = torch.bfloat16,
        device: Any = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, act_dtype, device)
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.float32, device=device))
        self._derived: dict[Any, Any] = {}  # FBGEMM's packed copy and row sums (W8A8), cast scales: built once

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, act_dtype: torch.dtype) -> Int8Linear:
        w = linear.weight.detach().float()  # [N, K]
        scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)  # [N]
        layer = cls(w.shape[1], w.shape[0], linear.bias is not None, act_dtype=act_dtype, device=w.device)
        layer.qweight.copy_(torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        layer.scales.copy_(scales)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach().float())
        return layer

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scales[:, None]

    def empty_like(self, out_features: int) -> Int8Linear:
        return Int8Linear(self.in_features, out_features, act_dtype=self.act_dtype, device="meta")

    def activations(self, x2: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor] | None]:
        if self.act_dtype != torch.int8:
            return super().activations(x2)
        if x2.shape[0] <= fbgemm_row_limit() and self.w8a8("packed") is not None:
            return x2 if x2.dtype == torch.float32 else x2.float(), None  # FBGEMM quantizes each row itself
        x = x2.float()
        lo, hi = x.amin(dim=1).clamp(max=0), x.amax(dim=1).clamp(min=0)  # [M]
        step = ((hi - lo) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        zero = torch.round(-lo / step)  # the level that stands for 0, in 0..127
        q = (torch.round(x / step[:, None]) + zero[:, None]).clamp(0, 127).to(torch.int8)  # [M, K]

        def finish(acc: torch.Tensor) -> torch.Tensor:  # (q - zero) . w = q . w - zero * sum(w), exact in int32
            acc = acc - zero.to(torch.int32)[:, None] * self.w8a8("row_sums")
            return acc.float() * self.scales * step[:, None]

        return q, finish

    def kernel(self, xa: torch.Tensor) -> torch.Tensor:
        if xa.dtype == torch.int8:  # int8 x int8 -> int32 (exact); activations' finish applies zero and scales
            return int8_product(xa, self.qweight)
        if self.act_dtype == torch.int8:  # fp32 rows for FBGEMM, one call each
            return fbgemm_rows(xa, self._derived["packed"])  # (activations just built it)
        return torch.ops.aten._weight_int8pack_mm(xa, self.qweight, self.scales_in(xa.dtype))

    def scales_in(self, dtype: torch.dtype) -> torch.Tensor:
        """The scales in the activations' dtype, cast once (the kernel takes them in that dtype)."""
        if self.scales.dtype == dtype:
            return self.scales
        source = self.source("scales")
        cast = self._derived.get(dtype)
        if cast is None or cast[0] != source:
            self._derived[dtype] = cast = (source, self.scales.to(dtype))
        return cast[1]

    def prepare_for_compile(self) -> None:
        if self.act_dtype == torch.int8:
            self.handle = w8a8_handle(self)
        else:
            self.scales_in(self.act_dtype)

    def compiled_product(self, x2: torch.Tensor) -> torch.Tensor:
        if self.act_dtype == torch.int8:
            return torch.ops.lmforge.w8a8_product(x2.float(), self.handle, self.out_features)
        scales = self._derived[self.act_dtype][1] if self.act_dtype != torch.float32 else self.scales
        return torch.ops.aten._weight_int8pack_mm(x2.to(self.act_dtype), self.qweight, scales)

    def w8a8(self, name: str) -> Any:
        """W8A8's derived weights: "packed", the weight packed for FBGEMM's dynamic-quantized product (None
        where this torch lacks it), or "row_sums", each output channel's sum of qweight (int32 [N])."""
        source = self.source("qweight", "scales")
        if self._derived.get("source") != source:  # first use, or new tensors were loaded: rebuild
            row_sums = self.qweight.sum(dim=1, dtype=torch.int32)
            self._derived.update(source=source, packed=fbgemm_pack(self.qweight, self.scales), row_sums=row_sums)
        return self._derived[name]


class Int4Linear(QuantLinear):
    """W [N, K] ~ (q - 8) * scale + zero per group of `group_size` inputs, q in 0..15 (asymmetric min/max, the
    convention of torch's int4 kernels); stored as qweight uint8 [N, K/2] (input 2j in the low nibble, 2j+1
    in the high one), scales and zeros [N, G] fp32. The kernel's own layout is built from them on first use."""

    bits = 4

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        group_size: int = 32,
        act_dtype: torch.dtype = torch.bfloat16,
        device: Any = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, act_dtype, device)
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("zeros", torch.empty(out_features, groups, dtype=torch.float32, device=device))
        self._kernel: dict[Any, Any] = {}  # the kernel's layout of the tensors, and its scales per dtype

    @staticmethod
    def supports(in_features: int, out_features: int, group_size: int) -> bool:
        """Shapes the int4 kernel takes: N a multiple of 16, K of the group size."""
        return group_size in INT4_GROUP_SIZES and out_features % 16 == 0 and in_features % group_size == 0

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, act_dtype: torch.dtype, group_size: int = 32) -> Int4Linear:
        w = linear.weight.detach().float()  # [N, K]
        N, K = w.shape
        wg = w.reshape(N, K // group_size, group_size)  # [N, G, g]
        lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)  # [N, G]
        scales = ((hi - lo) / 15).clamp(min=1e-8)
        q = torch.round((wg - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8).reshape(N, K)
        layer = cls(K, N, linear.bias is not None, group_size=group_size, act_dtype=act_dtype, device=w.device)
        layer.qweight.copy_(q[:, 0::2] | (q[:, 1::2] << 4))
        layer.scales.copy_(scales)
        layer.zeros.copy_(lo + 8 * scales)  # w = q * s + lo = (q - 8) * s + (lo + 8 s)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach().float())
        return layer

    def unpacked(self) -> torch.Tensor:
        """q [N, K] in 0..15 (int32)."""
        q = torch.stack([self.qweight & 0xF, self.qweight >> 4], dim=-1)  # [N, K/2, 2]
        return q.reshape(self.out_features, self.in_features).to(torch.int32)

    def dequantize(self) -> torch.Tensor:
        q = self.unpacked().float().reshape(self.out_features, -1, self.group_size)  # [N, G, g]
        w = (q - 8) * self.scales[..., None] + self.zeros[..., None]
        return w.reshape(self.out_features, self.in_features)

    def empty_like(self, out_features: int) -> Int4Linear:
        return Int4Linear(
            self.in_features, out_features, group_size=self.group_size, act_dtype=self.act_dtype, device="meta"
        )

    def _layout(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel's packed weight and its [G, N, 2] scales-and-zeros in `dtype`, built once."""
        source = self.source("qweight", "scales", "zeros")
        if self._kernel.get("source") != source:  # first use, or new tensors were loaded: rebuild
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.unpacked(), 1)
            self._kernel = {"source": source, "packed": packed}
        if dtype not in self._kernel:
            sz = torch.stack([self.scales.t(), self.zeros.t()], dim=-1)  # [G, N, 2]
            self._kernel[dtype] = sz.to(dtype).contiguous()
        return self._kernel["packed"], self._kernel[dtype]

    def kernel(self, xa: torch.Tensor) -> torch.Tensor:
        packed, sz = self._layout(xa.dtype)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(xa, packed, self.group_size, sz)

    def prepare_for_compile(self) -> None:
        self._layout(self.act_dtype)

    def compiled_product(self, x2: torch.Tensor) -> torch.Tensor:
        packed, sz = self._kernel["packed"], self._kernel[self.act_dtype]
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(self.act_dtype), packed, self.group_size, sz)

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"
