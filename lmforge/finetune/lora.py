"""Low-rank adaptation (LoRA; Hu et al. 2021, arXiv 2106.09685), applied to a model from outside, and
adapters stored in PEFT's format.

A targeted linear layer y = W x + b becomes

    y = W x + b + (alpha / r) * B A dropout(x)        A: [r, in], B: [out, r]

with W and b frozen. A starts Kaiming-uniform (a = sqrt(5)) and B at zero, as in PEFT, so a fresh adapter
leaves the model's function unchanged. `LoraLinear` keeps the wrapped layer's own weight and bias
Parameters under the same names, so the base model's state_dict keys do not change; adapters add
`<module>.lora_A` and `<module>.lora_B`.

Adapters are saved and loaded as PEFT writes them (adapter_config.json + adapter_model.safetensors, keys
`base_model.model.<HF module>.lora_{A,B}.weight`), so `peft.PeftModel.from_pretrained` applies ours to
the transformers model of the same checkpoint, and adapters trained with PEFT load here.

GLM-4 checkpoints fuse gate_proj and up_proj into one HF module, `mlp.gate_up_proj` (rows [0, I) gate,
[I, 2I) up). lmforge keeps them separate, so the adapters are converted both ways:

- saving: one LoRA of rank n*q for the n = 2 parts (q the largest part rank) that computes exactly the
  two separate ones: A = cat(A_gate, A_up) [2q, in], B = block-diag(B_gate, B_up) [2I, 2q], and alpha
  doubled for that module through PEFT's `rank_pattern` / `alpha_pattern`, so alpha / r is unchanged. An
  untargeted part (only gate or only up adapted) is an all-zero block of A and B.
- loading: when B is block-diagonal in that layout the parts are recovered exactly (a part whose blocks
  are both zero was not targeted). Otherwise (a general fused adapter trained with PEFT) both gate and up
  get the full A [R, in] and their own row half of B [I, R], at rank R: the same function exactly, but the
  two copies of A are independent parameters from then on (further training no longer ties them), and
  saving again writes a block-diagonal adapter of rank 2R.

Shape letters: r rank, i input features, o output features, n parts of a fused HF module.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.atomic import write_directory
from lmforge.checkpoint import to_hf_modules, write_safetensors
from lmforge.errors import LmforgeError, suggest
from lmforge.model import Transformer
from lmforge.options import option
from lmforge.quant.layers import QuantLinear
from lmforge.quant.quantize import dequantize

# Target name -> the module path inside each decoder layer.
TARGETS: dict[str, str] = {
    "q": "attn.q_proj",
    "k": "attn.k_proj",
    "v": "attn.v_proj",
    "o": "attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}

# PEFT's file format (peft/utils/save_and_load.py, peft/config.py).
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel.base_model (LoraModel) .model (the transformers model)
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
# Options that change what an adapter computes and that lmforge's LoraLinear does not implement.
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)",
    "use_rslora": "rank-stabilised scaling (use_rslora)",
    "lora_bias": "a bias on lora_B (lora_bias)",
    "fan_in_fan_out": "transposed weights (fan_in_fan_out)",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
}


def _number(x: float) -> int | float:
    """An integral float as int (PEFT types r and lora_alpha as int)."""
    return int(x) if float(x).is_integer() else float(x)


@dataclass(frozen=True)
class LoraConfig:
    """What to adapt and how: rank r, scaling alpha / r, dropout on the adapter's input, target layers.

    targets: any of q, k, v, o (attention projections) and gate, up, down (MLP), in every layer. A
    comma-separated string is accepted too; they are stored in that canonical order.
    """

    r: int = option(8, "LoRA rank")
    alpha: float = option(16.0, "LoRA alpha; the update is scaled by alpha / r")
    dropout: float = option(0.0, "dropout on the LoRA input")
    targets: tuple[str, ...] = option(("q", "v"), f"layers to adapt, comma-separated: {','.join(TARGETS)}")

    def __post_init__(self) -> None:
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise LmforgeError(f"LoRA rank r must be a positive integer, got {self.r!r}.")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < math.inf:
            raise LmforgeError(f"LoRA alpha must be a positive number (scaling = alpha / r), got {self.alpha!r}.")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise LmforgeError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}.")
        targets = self.targets
        if isinstance(targets, str):
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        targets = list(targets)
        unknown = [t for t in targets if t not in TARGETS]
        if unknown:
            hints = "".join(suggest(str(t), TARGETS) for t in unknown)
            raise LmforgeError(
                f"unknown LoRA target(s) {unknown}; the layers LoRA can adapt are {', '.join(TARGETS)}.{hints}"
            )
        if not targets:
            raise LmforgeError(f"LoRA needs at least one target; choose from {', '.join(TARGETS)}.")
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in targets))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def _adapter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    # Like PEFT (autocast_adapter_dtype): adapters of a half-precision base train in fp32.
    return torch.float32 if weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype


class _LowRank:
    """The adapter both LoRA layers share: lora_A [r, in], lora_B [out, r] and alpha; B = 0 at the start.
    Adapters are fp32 when the base is fp16/bf16 (or quantized), else in the base dtype."""

    in_features: int
    out_features: int
    lora_A: nn.Parameter
    lora_B: nn.Parameter
    lora_dropout: nn.Module
    alpha: float

    def _init_adapter(
        self, r: int, alpha: float, dropout: float, dtype: torch.dtype, device: Any, generator: Any
    ) -> None:
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        kw = {"dtype": _adapter_dtype(dtype), "device": device}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))
        self.alpha = float(alpha)
        # PEFT's init (peft/tuners/lora/layer.py): A as nn.Linear's default init, B zero.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)

    @property
    def r(self) -> int:
        return self.lora_A.shape[0]

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def dropout_p(self) -> float:
        return self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0

    def _update(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        h = F.linear(self.lora_dropout(x.to(self.lora_A.dtype)), self.lora_A)  # [..., r]
        return out + (F.linear(h, self.lora_B) * self.scaling).to(out.dtype)

    @torch.no_grad()
    def set_adapter(self, lora_A: torch.Tensor, lora_B: torch.Tensor, alpha: float) -> None:
        """Replace the adapter (any rank): A [r, in], B [out, r]; scaling becomes alpha / r."""
        r = lora_A.shape[0]
        assert lora_A.shape == (r, self.in_features) and lora_B.shape == (self.out_features, r), (
            lora_A.shape,
            lora_B.shape,
        )
        kw = {"dtype": self.lora_A.dtype, "device": self.lora_A.device}
        self.lora_A = nn.Parameter(lora_A.detach().to(**kw).clone(), requires_grad=self.lora_A.requires_grad)
        self.lora_B = nn.Parameter(lora_B.detach().to(**kw).clone(), requires_grad=self.lora_B.requires_grad)
        self.alpha = float(alpha)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A [out, in], in fp32 (or fp64 for an fp64 adapter)."""
        dtype = torch.promote_types(self.lora_A.dtype, torch.float32)
        return (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scaling

    def _extra(self) -> str:
        return f"r={self.r}, alpha={_number(self.alpha)}"


class LoraLinear(_LowRank, nn.Linear):
    """A linear layer plus a trainable low-rank update: F.linear(x, W, b) + (alpha/r) * B A dropout(x).

    Wraps `base` in place: `weight` and `bias` ARE base's Parameters (same objects, same names), so
    state_dict keys of the base stay; `lora_A` [r, in] and `lora_B` [out, r] are added.
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a second weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self._init_adapter(r, alpha, dropout, base.weight.dtype, base.weight.device, generator)

    def replicate_onto(self, base: nn.Linear) -> LoraLinear:
        """The same adapter shape around another base layer (lmforge.parallel.export rebuilds a sharded
        model's LoRA layers on the meta device, then loads the gathered tensors into them)."""
        return LoraLinear(base, self.r, self.alpha, self.dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._update(x, F.linear(x, self.weight, self.bias))  # [..., o]

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain nn.Linear computing the same function: weight W + scaling * B @ A (in W's dtype and device),
        bias the same Parameter object."""
        w, delta = self.weight, self.delta_weight()
        merged = (w.to(delta.dtype) + delta).to(w.dtype)
        with torch.device("meta"):
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight = nn.Parameter(merged, requires_grad=w.requires_grad)
        linear.register_parameter("bias", self.bias)
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._extra()}"


class QLoraLinear(_LowRank, nn.Module):
    """LoRA over a frozen weight-only quantized layer (QLoRA, Dettmers et al. 2023, with lmforge's int8/int4
    in place of NF4): base_layer(x) + (alpha/r) * B A dropout(x). The base stays quantized and is kept as
    the `base_layer` child (PEFT's name for it); gradients reach the input through its dequantized weight."""

    def __init__(self, base: QuantLinear, r: int, alpha: float, dropout: float = 0.0, *, generator: Any = None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.base_layer = base
        self._init_adapter(r, alpha, dropout, torch.float32, base.qweight.device, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._update(x, self.base_layer(x))

    def replicate_onto(self, base: QuantLinear) -> QLoraLinear:
        """The same adapter shape around another quantized base (see LoraLinear.replicate_onto)."""
        return QLoraLinear(base, self.r, self.alpha, self.dropout_p)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A float nn.Linear: the dequantized weight plus scaling * B @ A (merging gives up the quantization)."""
        merged = self.base_layer.dequantize() + self.delta_weight()
        with torch.device("meta"):
            linear = nn.Linear(self.in_features, self.out_features, bias=self.base_layer.bias is not None)
        linear.weight = nn.Parameter(merged)
        if self.base_layer.bias is not None:
            linear.bias = nn.Parameter(self.base_layer.bias.detach().float().clone())
        return linear

    def extra_repr(self) -> str:
        return self._extra()


LORA_LAYERS = (LoraLinear, QLoraLinear)


@dataclass(frozen=True)
class LoraReport:
    """What LoRA changed: wrapped layers, parameters (unique; the adapters included in `total`, as PEFT
    counts), and the gradient + AdamW memory it saves.

    memory_saved_bytes: full fine-tuning keeps a gradient and AdamW's two moments, each in the parameter's
    dtype (12 bytes per fp32 parameter), for every base parameter; LoRA keeps them for the trainable ones
    only: saved = 3 * (bytes of the frozen base parameters - bytes of the trainable ones), i.e.
    12 * (frozen - trainable) in fp32, where frozen = total - trainable is the base model's size.
    """

    modules: int
    trainable: int
    total: int
    trainable_percent: float
    memory_saved_bytes: int

    def __str__(self) -> str:
        return (
            f"LoRA on {self.modules} layers: {self.trainable:,} trainable of {self.total:,} parameters "
            f"({self.trainable_percent:.3f}%); ~{self.memory_saved_bytes / 2**20:,.1f} MiB of gradients and "
            "AdamW state saved vs full fine-tuning"
        )


def lora_modules(model: nn.Module) -> dict[str, LoraLinear | QLoraLinear]:
    """Module name -> LoRA layer (LoraLinear, or QLoraLinear over a quantized base), for every one in the model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LORA_LAYERS)}


def lora_report(model: nn.Module) -> LoraReport:
    """Counts for a model with LoRA layers (see LoraReport)."""
    adapter_ids = {id(p) for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)}
    params = list(model.parameters())  # unique: a tied embedding counts once
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    base_bytes = sum(p.numel() * p.element_size() for p in params if id(p) not in adapter_ids)
    trainable_bytes = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    return LoraReport(
        modules=len(lora_modules(model)),
        trainable=trainable,
        total=total,
        trainable_percent=100.0 * trainable / total if total else 0.0,
        memory_saved_bytes=3 * (base_bytes - trainable_bytes),
    )


def _target_modules(model: Transformer, targets: Iterable[str]) -> list[str]:
    return [f"layers.{i}.{TARGETS[t]}" for i in range(len(model.layers)) for t in targets]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


def apply_lora(model: Transformer, config: LoraConfig, *, generator: torch.Generator | None = None) -> LoraReport:
    """Wrap the targeted linear layers of every decoder layer in LoraLinear and freeze everything else.

    Only the adapters are trainable afterwards (requires_grad), which is all the training loop and the
    optimizer look at. `generator` seeds the initialisation of A (default: torch's global RNG).
    """
    if not isinstance(config, LoraConfig):
        raise LmforgeError(f"apply_lora needs a LoraConfig, got {type(config).__name__}.")
    if lora_modules(model):
        raise LmforgeError(
            "the model already has LoRA layers; merge them first (merge_lora) or start from the base model."
        )
    names = _target_modules(model, config.targets)
    for name in names:  # check all before changing anything
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if type(module) is not nn.Linear and not isinstance(module, QuantLinear):
            raise LmforgeError(
                f"LoRA target {name} is not a linear layer of this model ({type(module).__name__}); "
                f"the targets are {', '.join(f'{t} ({p})' for t, p in TARGETS.items())}."
            )
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        layer = QLoraLinear if isinstance(base, QuantLinear) else LoraLinear
        _set_module(model, name, layer(base, config.r, config.alpha, config.dropout, generator=generator))
    return lora_report(model)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer into its weight (W + scaling * B @ A); the model becomes plain again, with every
    parameter trainable (a quantized base is dequantized: the result is a float model). Returns the model."""
    for name, module in lora_modules(model).items():
        _set_module(model, name, module.merge())
    if getattr(model, "quantization_config", None) is not None:  # QLoRA: the merged layers are float now
        dequantize(model)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, under the model's own names (`layers.0.attn.q_proj.lora_A`, ...)."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


# --- PEFT format: saving ---------------------------------------------------------------------------
def _fuse(
    parts: list[LoraLinear | QLoraLinear | None], outs: list[int], in_features: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One LoRA (A [n*q, i], B [sum o, n*q], alpha) equal to the parts' LoRAs stacked by rows.

    Part j's adapter sits in rows [j*q, j*q + r_j) of A and the matching columns of B's j-th row block
    (zero-padded to the largest rank q); an absent part is a zero block. Parts with a different scaling
    than the first have it folded into their B (exact up to rounding)."""
    present = [m for m in parts if m is not None]
    first = present[0]
    q, n = max(m.r for m in present), len(parts)
    dtype, device = first.lora_A.dtype, first.lora_A.device
    A = torch.zeros(n * q, in_features, dtype=dtype, device=device)  # [n*q, i]
    B = torch.zeros(sum(outs), n * q, dtype=dtype, device=device)  # [sum o, n*q]
    row = 0
    for j, (m, o) in enumerate(zip(parts, outs, strict=True)):
        if m is not None:
            A[j * q : j * q + m.r] = m.lora_A.detach()
            b = m.lora_B.detach()
            B[row : row + o, j * q : j * q + m.r] = b if m.scaling == first.scaling else b * (m.scaling / first.scaling)
        row += o
    # alpha / (n*q) must equal first.alpha / first.r; multiply before dividing to keep integers exact.
    return A, B, first.alpha * (n * q) / first.r


def _peft_tensors(model: Transformer) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, float]]]:
    """PEFT keys -> tensors, and HF module -> (rank, alpha), for every adapted HF module."""
    loras = lora_modules(model)
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, float]] = {}
    for hf, parts in to_hf_modules(_target_modules(model, TARGETS), model.config.family).items():
        mods = [loras.get(p) for p in parts]
        if all(m is None for m in mods):
            continue
        if len(parts) == 1:
            m = mods[0]
            assert m is not None
            A, B, alpha = m.lora_A.detach(), m.lora_B.detach(), m.alpha
        else:
            linears = [model.get_submodule(p) for p in parts]
            A, B, alpha = _fuse(mods, [lin.out_features for lin in linears], linears[0].in_features)
        tensors[f"{PEFT_PREFIX}{hf}.lora_A.weight"] = A.contiguous()  # [r, i]
        tensors[f"{PEFT_PREFIX}{hf}.lora_B.weight"] = B.contiguous()  # [o, r]
        shapes[hf] = (A.shape[0], alpha)
    return tensors, shapes


def _patterns(values: dict[str, Any], default: Any) -> dict[str, Any]:
    """PEFT rank_pattern / alpha_pattern entries for the modules whose value is not the default.

    PEFT matches a key against a module name with re.match(rf"(.*\\.)?({key})$", name) (older versions:
    rf".*\\.{key}$"): a leaf name (`gate_up_proj`) covers every layer, used when all modules with that
    leaf share the value; otherwise each module gets its own escaped key without the leading `model.`."""
    by_leaf: dict[str, dict[str, Any]] = {}
    for module, value in values.items():
        by_leaf.setdefault(module.rpartition(".")[2], {})[module] = value
    out: dict[str, Any] = {}
    for leaf, modules in sorted(by_leaf.items()):
        distinct = set(modules.values())
        if distinct == {default}:
            continue
        if len(distinct) == 1:
            out[leaf] = distinct.pop()
            continue
        for module, value in sorted(modules.items()):
            if value != default:
                out[re.escape(module.partition(".")[2] or module)] = value
    return out


def _peft_config(config: LoraConfig, shapes: dict[str, tuple[int, float]], base_model: str) -> dict[str, Any]:
    """adapter_config.json as PEFT writes it (fields known to every peft >= 0.10; newer versions fill the rest
    with their defaults)."""
    ranks = {m: r for m, (r, _) in shapes.items()}
    alphas = {m: _number(a) for m, (_, a) in shapes.items()}
    return {
        "alpha_pattern": _patterns(alphas, _number(config.alpha)),
        "auto_mapping": None,
        "base_model_name_or_path": base_model or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": _number(config.alpha),
        "lora_dropout": config.dropout,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": config.r,
        "rank_pattern": _patterns(ranks, config.r),
        "revision": None,
        "target_modules": sorted({m.rpartition(".")[2] for m in shapes}),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }


def save_adapter(
    model: Transformer, config: LoraConfig, path: str | os.PathLike, base_model_name_or_path: str = ""
) -> Path:
    """Write the model's LoRA adapters as PEFT does: `path/adapter_config.json` + `adapter_model.safetensors`.

    `peft.PeftModel.from_pretrained(<transformers model of the base checkpoint>, path)` then computes what
    this model computes. `config` supplies r, lora_alpha and lora_dropout; layers whose rank or alpha differ
    (GLM's fused gate_up_proj, adapters loaded from elsewhere) are listed in rank_pattern / alpha_pattern.
    The directory is written beside `path` and swapped in when complete; other files already in `path`
    are kept.
    """
    loras = lora_modules(model)
    if not loras:
        raise LmforgeError("the model has no LoRA layers to save; call apply_lora (or load_adapter) first.")
    wrapped = tuple(t for t in TARGETS if any(name.endswith(f".{TARGETS[t]}") for name in loras))
    if wrapped != config.targets:
        raise LmforgeError(
            f"the model's LoRA layers target {', '.join(wrapped)} but the LoraConfig says "
            f"{', '.join(config.targets)}; pass the config the adapters were created with."
        )
    tensors, shapes = _peft_tensors(model)
    peft_config = _peft_config(config, shapes, base_model_name_or_path)

    def write(tmp: Path) -> None:
        write_safetensors(tmp / ADAPTER_WEIGHTS, tensors, {"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")

    owned = {ADAPTER_CONFIG, ADAPTER_WEIGHTS, "adapter_model.bin"}
    return write_directory(path, write, owned=owned.__contains__)


# --- PEFT format: loading --------------------------------------------------------------------------
def _read_peft_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise LmforgeError(f"{path} does not exist; pass a LoRA adapter directory (adapter_config.json + weights).")
    if not path.is_dir():
        raise LmforgeError(f"{path} is a file; pass the adapter directory that holds {ADAPTER_CONFIG}.")
    file = path / ADAPTER_CONFIG
    if not file.is_file():
        raise LmforgeError(f"{path} has no {ADAPTER_CONFIG}; is it a PEFT adapter directory?")
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmforgeError(f"{file} is not valid JSON ({e}); re-save the adapter.") from None
    if not isinstance(cfg, dict):
        raise LmforgeError(f"{file} does not hold a JSON object; re-save the adapter.")
    if cfg.get("peft_type") != "LORA":
        raise LmforgeError(
            f"{file}: peft_type is {cfg.get('peft_type')!r}; lmforge loads LoRA adapters only (peft_type LORA)."
        )
    if cfg.get("task_type") not in (None, "CAUSAL_LM"):
        raise LmforgeError(f"{file}: task_type {cfg['task_type']!r} is not a causal LM adapter (CAUSAL_LM).")
    if cfg.get("bias", "none") != "none":
        raise LmforgeError(
            f"{file}: bias={cfg['bias']!r} trains the base layers' biases; lmforge supports bias 'none' only. "
            "Merge the adapter with peft (merge_and_unload) and load the merged model instead."
        )
    used = [desc for key, desc in _UNSUPPORTED.items() if cfg.get(key)]
    if used:
        raise LmforgeError(
            f"{file} uses {', '.join(used)}, which lmforge's LoRA does not support; merge the adapter with peft "
            "(merge_and_unload) and load the merged model instead."
        )
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise LmforgeError(f"{file}: {key} must be a JSON object; re-save the adapter.")
    return cfg


def _read_peft_tensors(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """HF module -> {"A": lora_A [r, i], "B": lora_B [o, r]}."""
    file = path / ADAPTER_WEIGHTS
    if not file.is_file():
        if (path / "adapter_model.bin").is_file():
            raise LmforgeError(
                f"{path} holds adapter_model.bin (PyTorch pickle); lmforge reads safetensors. Re-save it with "
                "peft's save_pretrained(..., safe_serialization=True)."
            )
        raise LmforgeError(f"{path} has no {ADAPTER_WEIGHTS}; the adapter's weights are missing.")
    from safetensors.torch import load_file

    try:
        state = load_file(str(file))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise LmforgeError(f"{file} is not a readable safetensors file ({e}); it is truncated or corrupt.") from None
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unsupported = []
    for key, tensor in state.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            unsupported.append(key)
            continue
        modules.setdefault(m["module"], {})[m["ab"]] = tensor
    if unsupported:
        raise LmforgeError(
            f"{file} holds tensors lmforge's LoRA cannot use: {', '.join(sorted(unsupported)[:4])}"
            + (f" and {len(unsupported) - 4} more" if len(unsupported) > 4 else "")
            + " (only lora_A/lora_B weights of linear layers are supported; no DoRA, biases or embedding adapters)."
        )
    if not modules:
        raise LmforgeError(f"{file} holds no LoRA weights.")
    half = sorted(m for m, ab in modules.items() if len(ab) != 2)
    if half:
        raise LmforgeError(f"{file}: {', '.join(half[:4])} lack lora_A or lora_B; the file is incomplete: re-save it.")
    return modules


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    # PEFT's rule (peft.utils.other.get_pattern_key): the first key that matches the end of the module name.
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error:
            continue
    return default


def _split_fused(
    parts: tuple[str, ...], outs: list[int], A: torch.Tensor, B: torch.Tensor, alpha: float
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Per-part adapters (A, B, alpha) that compute exactly what the fused LoRA A [R, i], B [sum o, R] does."""
    n, R = len(parts), A.shape[0]
    rows = B.split(outs, dim=0)  # n x [o, R]
    if R % n == 0:
        q = R // n
        block_diagonal = all(not rows[j][:, k * q : (k + 1) * q].any() for j in range(n) for k in range(n) if k != j)
        if block_diagonal:  # the layout save_adapter writes: recover each part (rank q, same scaling)
            out = {}
            for j, part in enumerate(parts):
                a, b = A[j * q : (j + 1) * q], rows[j][:, j * q : (j + 1) * q]  # [q, i], [o, q]
                if a.any() or b.any():  # both blocks zero: this part was not targeted
                    out[part] = (a, b, alpha / n)
            return out
    # A general fused adapter: every part reads the whole A and writes its rows of B (rank R each).
    return {part: (A, rows[j], alpha) for j, part in enumerate(parts)}


def load_adapter(model: Transformer, path: str | os.PathLike) -> LoraConfig:
    """Load a PEFT LoRA adapter directory (saved by lmforge or by peft for a llama, qwen2, glm or glm4
    model) into `model`: apply_lora with the adapter's targets, then set every adapter's weights.

    Returns the LoraConfig (r, lora_alpha, lora_dropout of adapter_config.json and the targets found).
    Layers whose rank or alpha differ from it (rank_pattern / alpha_pattern, GLM's fused gate_up_proj)
    keep their own rank and alpha. Target layers with no weights in the file (an adapter restricted to
    some layers) keep B = 0 and so change nothing.
    """
    path = Path(path)
    cfg = _read_peft_config(path)
    state = _read_peft_tensors(path)
    file = path / ADAPTER_WEIGHTS
    hf_map = to_hf_modules(_target_modules(model, TARGETS), model.config.family)
    unknown = sorted(m for m in state if m not in hf_map)
    if unknown:
        leaves = sorted({m.rpartition(".")[2] for m in hf_map})
        raise LmforgeError(
            f"{file} adapts module(s) this model does not have or lmforge cannot adapt: {', '.join(unknown[:4])}"
            + (f" and {len(unknown) - 4} more" if len(unknown) > 4 else "")
            + f". The model has {len(model.layers)} layers whose adaptable modules are {', '.join(leaves)}; "
            "is the adapter for this base model?"
        )
    default_alpha = cfg.get("lora_alpha", 8)
    specs: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for hf, ab in sorted(state.items()):
        A, B = ab["A"], ab["B"]  # [R, i], [o, R]
        parts = hf_map[hf]
        linears = [model.get_submodule(p) for p in parts]
        outs = [lin.out_features for lin in linears]
        expected = ([A.shape[0], linears[0].in_features], [sum(outs), A.shape[0]])
        if A.dim() != 2 or B.dim() != 2 or [list(A.shape), list(B.shape)] != [list(e) for e in expected]:
            raise LmforgeError(
                f"{file}: {hf} has lora_A {list(A.shape)} and lora_B {list(B.shape)}, but this model needs "
                f"[r, {linears[0].in_features}] and [{sum(outs)}, r]; is the adapter for this base model?"
            )
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, hf, default_alpha)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise LmforgeError(f"{file}: lora_alpha for {hf} is {alpha!r}; it must be a positive number.")
        if len(parts) == 1:
            specs[parts[0]] = (A, B, float(alpha))
        else:
            specs.update(_split_fused(parts, outs, A, B, float(alpha)))
    targets = tuple(t for t, sub in TARGETS.items() if any(name.endswith(f".{sub}") for name in specs))
    try:
        config = LoraConfig(
            r=cfg.get("r", 8), alpha=default_alpha, dropout=cfg.get("lora_dropout", 0.0), targets=targets
        )
    except LmforgeError as e:
        raise LmforgeError(f"{path / ADAPTER_CONFIG}: {e}") from None
    apply_lora(model, config, generator=torch.Generator().manual_seed(0))
    for name, (A, B, alpha) in specs.items():
        module = model.get_submodule(name)
        assert isinstance(module, LORA_LAYERS)
        module.set_adapter(A, B, alpha)
    return config
