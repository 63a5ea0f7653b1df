"""Sizes and costs of a model config: parameters, bytes, KV-cache bytes, training FLOPs per token."""

from __future__ import annotations

import dataclasses
from typing import Any

from lmforge.config import ModelConfig
from lmforge.model import Transformer


def count_parameters(config: ModelConfig) -> tuple[int, int]:
    """(total unique parameters, non-embedding parameters), counted on the meta device (no memory).

    Non-embedding excludes the token embedding and an untied output head (REFERENCE.md section 2)."""
    model = Transformer(config, device="meta")
    total = sum(p.numel() for p in model.parameters())  # a tied embedding is one Parameter, counted once
    embedding = model.embed.weight.numel() + (0 if model.lm_head is None else model.lm_head.weight.numel())
    return total, total - embedding


FLOPS_SEQ_LEN = 2048  # the sequence length FLOPs per token assume unless told


def model_stats(config: ModelConfig, seq_len: int = FLOPS_SEQ_LEN) -> dict[str, Any]:
    """The numbers `lmforge info` prints; FLOPs assume training at `seq_len` tokens per sequence."""
    total, non_embedding = count_parameters(config)
    c = config
    kv_bytes = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 2  # K and V, bf16
    # 6N for the matmuls (forward + backward) plus 12*L*H*d*T for attention scores (Chinchilla appendix F).
    flops = 6 * non_embedding + 12 * c.num_layers * c.num_heads * c.head_dim * seq_len
    return {
        "params": total,
        "non_embedding_params": non_embedding,
        "bytes_fp32": total * 4,
        "bytes_bf16": total * 2,
        "kv_cache_bytes_per_token": kv_bytes,
        "flops_per_token": flops,
        "flops_seq_len": seq_len,
        "config": {f.name: _plain(getattr(c, f.name)) for f in dataclasses.fields(c)},
    }


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {k: v for k, v in dataclasses.asdict(value).items() if v is not None}
    return list(value) if isinstance(value, tuple) else value


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M'; bytes with unit='B' -> '1.23 GB'."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{' ' if unit else ''}{suffix}{unit}"
    return f"{n:g}{' ' if unit else ''}{unit}"


def format_stats(name: str, stats: dict[str, Any]) -> str:
    lines = [
        f"{name}",
        f"  parameters          {stats['params']:,} ({human(stats['params'])})",
        f"  non-embedding       {stats['non_embedding_params']:,} ({human(stats['non_embedding_params'])})",
        f"  weights             {human(stats['bytes_fp32'], 'B')} fp32, {human(stats['bytes_bf16'], 'B')} bf16",
        f"  KV cache            {human(stats['kv_cache_bytes_per_token'], 'B')} per token (bf16)",
        f"  training FLOPs      {human(stats['flops_per_token'])} per token at seq_len {stats['flops_seq_len']}",
    ]
    if "file" in stats:  # a GGUF file: its size and tensor types
        types = ", ".join(f"{n} {t}" for t, n in stats["file"]["tensor_types"].items())
        lines.append(f"  file                {human(stats['file']['bytes'], 'B')}, tensors: {types}")
    lines.append("  config")
    for k, v in stats["config"].items():
        if k != "source" or v:
            lines.append(f"    {k:<24}{v}")
    return "\n".join(lines)
