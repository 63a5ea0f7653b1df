"""`quantize(model, method, group_size)`: replace a model's linear layers by weight-only int8 / int4 ones.

Applied from outside the model file, after loading (gpt-fast's quantize pass): every projection of every
block, and the output head (for a tied model the head gets its own quantized copy; the embedding table
stays in float, as a lookup reads one row per token). A layer the int4 kernel cannot take (N not a multiple
of 16, K not of the group size) stays in float and is reported.

The activation dtype of the kernels is measured, not assumed: `act_dtype="auto"` times one product of each
kernel with fp32 and with bf16 inputs on this machine and keeps the faster (bf16 on every CPU seen so far,
AVX2-only ones included: torch's fp32 paths of these kernels are scalar).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.options import option, validate
from lmforge.quant.layers import INT4_GROUP_SIZES, Int4Linear, Int8Linear, QuantLinear
from lmforge.quant.shared_input import share_inputs
from lmforge.quant.timing import best_seconds

METHODS = ("int8", "int4")
ACT_DTYPES = ("auto", "float32", "bfloat16", "int8")
QUANT_METHOD = "lmforge"  # config.json's quantization_config.quant_method for checkpoints written here


@dataclass(frozen=True)
class QuantConfig:
    """How `quantize` compresses a model (the flags of `lmforge quantize`)."""

    method: str = option("int8", "int8 (per output channel) or int4 (per group of inputs)", choices=METHODS)
    group_size: int = option(32, "int4: inputs sharing one scale and zero point", choices=INT4_GROUP_SIZES)
    act_dtype: str = option(
        "auto",
        "compute dtype of the quantized products (auto: the faster of float32 and bfloat16 here, measured; int8: "
        "int8 method only, activations quantized per token too, W8A8)",
        choices=ACT_DTYPES,
    )
    head: bool = option(True, "quantize the output head too (a tied head gets its own quantized copy)")

    def __post_init__(self) -> None:
        validate(self)
        if self.act_dtype == "int8" and self.method != "int8":
            raise LmforgeError("act_dtype int8 (W8A8) goes with method int8; int4 layers take float32 or bfloat16.")

    def to_hf(self) -> dict[str, Any]:
        """config.json's quantization_config (act_dtype is a property of the machine, not of the file)."""
        bits = 8 if self.method == "int8" else 4
        out: dict[str, Any] = {"quant_method": QUANT_METHOD, "method": self.method, "bits": bits, "head": self.head}
        if self.method == "int4":
            out["group_size"] = self.group_size
        if self.act_dtype == "int8":  # changes the numbers, so it travels with the file (the others are speed)
            out["act_dtype"] = "int8"
        return out

    @classmethod
    def from_hf(cls, d: dict[str, Any], where: str = "config.json") -> QuantConfig:
        if not isinstance(d, dict) or d.get("quant_method") != QUANT_METHOD:
            d = d if isinstance(d, dict) else {"quant_method": d}
            raise LmforgeError(
                f"{where}: quantization_config.quant_method {d.get('quant_method')!r} is not one lmforge reads "
                f"({QUANT_METHOD!r}, written by `lmforge quantize`); load the unquantized checkpoint instead."
            )
        try:
            return cls(
                method=d["method"],
                group_size=d.get("group_size", 32),
                head=d.get("head", True),
                act_dtype=d.get("act_dtype", "auto"),
            )
        except KeyError as e:
            raise LmforgeError(f"{where}: quantization_config lacks {e}; re-run `lmforge quantize`.") from None
        except LmforgeError as e:
            raise LmforgeError(f"{where}: quantization_config: {e}") from None


@dataclass
class QuantReport:
    method: str
    act_dtype: str
    layers: int
    skipped: list[str] = field(default_factory=list)  # kept in float: the kernel does not take their shape
    bytes_before: int = 0  # of the replaced layers' weights
    bytes_after: int = 0

    def __str__(self) -> str:
        kept = f"; {len(self.skipped)} kept in float ({', '.join(self.skipped[:3])}...)" if self.skipped else ""
        return (
            f"{self.method}: {self.layers} layers, {self.bytes_before / 2**20:,.1f} -> {self.bytes_after / 2**20:,.1f} "
            f"MiB of weights ({self.bytes_before / max(self.bytes_after, 1):.1f}x smaller), products in "
            f"{self.act_dtype}{kept}"
        )


def quantize(
    model: Transformer,
    method: str = "int8",
    group_size: int = 32,
    *,
    act_dtype: str = "auto",
    head: bool = True,
) -> QuantReport:
    """Replace the model's linear layers by weight-only quantized ones, in place (see the module docstring).

    The model then holds `quantization_config` (what `lmforge.save_pretrained` writes to config.json). On a
    model built on the meta device the layers are left empty, for a loader's load_state_dict(assign=True)."""
    config = QuantConfig(method, group_size, act_dtype, head)
    if quantized_layers(model):
        raise LmforgeError("this model is already quantized; load the float checkpoint to quantize it again.")
    dtype = resolve_act_dtype(config)
    report = QuantReport(method, str(dtype).removeprefix("torch."), 0)
    for name, linear in _targets(model, config):
        if method == "int4" and not Int4Linear.supports(linear.in_features, linear.out_features, group_size):
            report.skipped.append(name)
            continue
        if linear.weight.is_meta:
            layer = _empty(linear, config, dtype)
        elif method == "int8":
            layer = Int8Linear.from_linear(linear, dtype)
        else:
            layer = Int4Linear.from_linear(linear, dtype, group_size)
        report.layers += 1
        report.bytes_before += linear.weight.numel() * linear.weight.element_size()
        report.bytes_after += layer.weight_bytes()
        _set(model, name, layer)
    if report.layers == 0:
        raise LmforgeError(
            f"no layer of this model has a shape the {method} kernel takes (int4: out features a multiple of 16, "
            f"in features of --group-size {group_size}); try int8 or a smaller group size."
        )
    share_inputs(model)  # q/k/v and gate/up: one kernel call each
    model.quantization_config = config.to_hf()
    return report


def quantize_as(model: Transformer, quantization_config: dict[str, Any], where: str = "config.json") -> QuantReport:
    """`quantize` with the settings a quantized model or checkpoint records (its `quantization_config`):
    how loaders rebuild a quantized model's empty layers on the meta device before filling them."""
    q = QuantConfig.from_hf(quantization_config, where)
    return quantize(model, q.method, q.group_size, act_dtype=q.act_dtype, head=q.head)


@torch.no_grad()
def dequantize(model: Transformer) -> Transformer:
    """The inverse pass, in place: every quantized layer becomes a float nn.Linear holding its dequantized
    weight (what the quantized model computes, up to the kernels' activation rounding); a head that was a
    copy of a tied embedding is dropped again. Returns the model."""
    for name, layer in quantized_layers(model).items():
        if name == "lm_head" and model.config.tie_embeddings:
            model.lm_head = None
            continue
        with torch.device("meta"):
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        linear.weight = nn.Parameter(layer.dequantize())
        if layer.bias is not None:
            linear.bias = nn.Parameter(layer.bias.detach().float().clone())
        _set(model, name, linear)
    if hasattr(model, "quantization_config"):
        del model.quantization_config
    return model


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def _targets(model: Transformer, config: QuantConfig) -> list[tuple[str, nn.Linear]]:
    linears = [(n, m) for n, m in model.layers.named_modules(prefix="layers") if type(m) is nn.Linear]
    if config.head:
        if model.lm_head is None:  # tied: the head becomes its own layer over a copy of the embedding
            c = model.config
            weight = model.embed.weight
            with torch.device("meta"):
                head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
            head.weight = nn.Parameter(weight.detach(), requires_grad=False)
            linears.append(("lm_head", head))
        elif type(model.lm_head) is nn.Linear:
            linears.append(("lm_head", model.lm_head))
    return linears


def _empty(linear: nn.Linear, config: QuantConfig, dtype: torch.dtype) -> QuantLinear:
    n, k, bias = linear.out_features, linear.in_features, linear.bias is not None
    if config.method == "int8":
        return Int8Linear(k, n, bias, act_dtype=dtype, device="meta")
    return Int4Linear(k, n, bias, group_size=config.group_size, act_dtype=dtype, device="meta")


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def resolve_act_dtype(config: QuantConfig) -> torch.dtype:
    if config.act_dtype != "auto":
        return getattr(torch, config.act_dtype)
    return _fastest_act_dtype(config.method, config.group_size)


@functools.cache
def _fastest_act_dtype(method: str, group_size: int) -> torch.dtype:
    """Time a decode-sized product of the kernel in fp32 and in bf16 (on torch's threads, as decode steps run
    it), the best of a few calls after a first that may build kernels; the faster wins."""
    k, n = 1024, 1024
    linear = nn.Linear(k, n, bias=False)
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        if method == "int8":
            layer: QuantLinear = Int8Linear.from_linear(linear, dtype)
        else:
            layer = Int4Linear.from_linear(linear, dtype, group_size)
        x = torch.randn(1, k, dtype=dtype)
        times[dtype] = best_seconds(lambda layer=layer, x=x: layer.product(x), repeats=5)
    return min(times, key=times.__getitem__)
