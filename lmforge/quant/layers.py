"""Weight-only quantized linear layers: int8 per output channel, int4 per group of inputs.

Decoding is bound by the bytes of weights read per token; storing them in 8 or 4 bits reads 4x or 8x
fewer than fp32. Both layers run torch's own CPU kernels (aten `_weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu`, gpt-fast's choice), which dequantize inside the product. Those kernels are
fast with bf16 activations and slow with fp32 ones on every CPU measured here (benchmarks/RESULTS.md), so
each layer computes in an `act_dtype` chosen by measurement (lmforge.quant.quantize) and returns its
output in the input's dtype. Elsewhere (CUDA, or a kernel refusing a shape) they dequantize and use F.linear.

Letters: M rows of input (tokens), K input features, N output features, G groups of `group_size` inputs.

`act_dtype=torch.int8` (int8 layers only) also quantizes each input row to int8 on the fly and multiplies
with torch._int_mm (integer dot products, exact in int32): W8A8, what llama.cpp's q8_0 products do.

Gradients flow to the input (not to the frozen quantized weight), so LoRA adapters before and after a
quantized layer train (QLoRA, Dettmers et al. 2023, with int4/int8 in place of NF4).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernel accepts
INT4_ROW_BLOCK = 64  # the CPU int4 layout packs rows in blocks of 64: threads split at these boundaries


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
    """What the int8 and int4 layers share: shapes, the bias, the compute dtype, the thread split."""

    bits: int = 0
    row_align: int = 1
    gemv: Any = None  # a ParallelGemv while one is installed (lmforge.generate.gemv): it splits small products

    def __init__(self, in_features: int, out_features: int, bias: bool, act_dtype: torch.dtype, device: Any) -> None:
        super().__init__()
        self.in_features, self.out_features, self.act_dtype = in_features, out_features, act_dtype
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        if torch.is_grad_enabled() and x2.requires_grad:
            y = _WeightOnlyMatmul.apply(x2, self)
        else:
            y = self.product(x2)
        y = y.to(x.dtype)  # [M, N]
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def product(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [M, K] @ W^T -> [M, N]: the kernel on CPU (rows split over threads by a ParallelGemv while one is
        installed), a dequantized F.linear elsewhere."""
        if x2.device.type != "cpu":
            return F.linear(x2.to(self.compute_dtype), self.dequantize().to(self.compute_dtype))
        xa, row_scale = self.activations(x2)
        y = None
        if self.gemv is not None and not torch.is_grad_enabled():
            y = self.gemv.split(xa, self.out_features, self.rows_into, self.row_align, self.compute_dtype)
        if y is None:
            y = self.rows(xa, 0, self.out_features)
        return y if row_scale is None else y * row_scale[:, None]

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float32 if self.act_dtype == torch.int8 else self.act_dtype

    def activations(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the kernel multiplies, and a scale per row to apply to its output (int8 activations)."""
        return x2.to(self.act_dtype), None

    def rows_into(self, x2: torch.Tensor, a: int, b: int, out: torch.Tensor) -> None:
        """Output features a..b into `out` [M, b - a] (one thread's share of a split product)."""
        out.copy_(self.rows(x2, a, b))

    def rows(self, x2: torch.Tensor, a: int, b: int) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The weight [N, K] in fp32."""
        raise NotImplementedError

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

    def activations(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.act_dtype != torch.int8:
            return super().activations(x2)
        # W8A8: each row of the input quantized on the fly (absmax / 127), as llama.cpp's q8_0 products do.
        scale = (x2.abs().amax(dim=1).float() / 127).clamp(min=torch.finfo(torch.float32).tiny)  # [M]
        return torch.round(x2.float() / scale[:, None]).clamp(-127, 127).to(torch.int8), scale

    def rows(self, x2: torch.Tensor, a: int, b: int) -> torch.Tensor:
        if x2.dtype == torch.int8:  # int8 x int8 -> int32 (exact), then the weight's per-channel scale
            return torch._int_mm(x2, self.qweight[a:b].t()).float() * self.scales[a:b]
        return torch.ops.aten._weight_int8pack_mm(x2, self.qweight[a:b], self.scales[a:b].to(x2.dtype))


class Int4Linear(QuantLinear):
    """W [N, K] ~ (q - 8) * scale + zero per group of `group_size` inputs, q in 0..15 (asymmetric min/max, the
    convention of torch's int4 kernels); stored as qweight uint8 [N, K/2] (input 2j in the low nibble, 2j+1
    in the high one), scales and zeros [N, G] fp32. The kernel's own layout is built from them on first use."""

    bits = 4
    row_align = INT4_ROW_BLOCK

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
        self._kernel: dict[Any, Any] = {}  # the kernel's layout of the tensors, and scales per (dtype, row range)

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

    def _layout(self, dtype: torch.dtype, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel's packed weight for rows a..b (a view: the layout packs rows in blocks of 64, so a split
        at multiples of 64 is a slice of it) and their [G, b - a, 2] scales-and-zeros in `dtype`, built once."""
        source = (id(self.qweight), id(self.scales), id(self.zeros))
        if self._kernel.get("source") != source:  # first use, or new tensors were loaded: rebuild
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.unpacked(), 1)
            self._kernel = {"source": source, "packed": packed}
        if (dtype, a, b) not in self._kernel:
            sz = torch.stack([self.scales[a:b].t(), self.zeros[a:b].t()], dim=-1)  # [G, b - a, 2]
            self._kernel[dtype, a, b] = sz.to(dtype).contiguous()
        return self._kernel["packed"][a:b], self._kernel[dtype, a, b]

    def rows(self, x2: torch.Tensor, a: int, b: int) -> torch.Tensor:
        packed, sz = self._layout(x2.dtype, a, b)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, self.group_size, sz)

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"
