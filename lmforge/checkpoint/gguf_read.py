"""Import: a GGUF file (llama, qwen2, glm4) -> an lmforge model, its tokenizer, or an HF directory.

Every tensor type the gguf package can dequantize is read (F32, F16, BF16, Q4_0 ... Q8_0, the K-quants,
the IQ types), into float32: GGUF mixes types within one file, and the dequantized values are exact in
fp32. Llama's Q/K rows are put back in transformers' order; GLM-4's fused ffn_up is split into gate and up.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.checkpoint.gguf_config import config_from_gguf
from lmforge.checkpoint.gguf_names import (
    ROPE_FREQS,
    from_llamacpp_rows,
    gguf_name,
    import_gguf,
    permuted_heads,
    to_gguf_names,
)
from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer


def _open(path: Path) -> tuple[Any, dict[str, Any]]:
    """(GGUFReader, metadata dict) for `path`, with LmforgeErrors for a missing or unreadable file."""
    gguf = import_gguf()
    if not path.is_file():
        raise LmforgeError(f"{path} does not exist or is not a file; pass a .gguf file.")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, struct/IndexError... for a damaged file
        raise LmforgeError(f"{path} is not a readable GGUF file ({e}); it is truncated or not GGUF.") from None
    meta = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    return reader, meta


def _dequantize(tensor: Any, source: Path) -> torch.Tensor:
    """One GGUF tensor as fp32, in numpy (= torch) dimension order."""
    gguf = import_gguf()
    try:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise LmforgeError(
            f"{source}: tensor {tensor.name} has type {tensor.tensor_type.name}, which the gguf package cannot "
            "dequantize; re-quantize the model to another type (e.g. Q8_0, Q4_K_M)."
        ) from None
    shape = tuple(reversed([int(d) for d in tensor.shape]))
    return torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape))  # a copy: the file stays read-only


def _shapes(reader: Any) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(reversed([int(d) for d in t.shape])) for t in reader.tensors}


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether `path` is a file that starts with GGUF's magic bytes."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def gguf_tensor_types(path: str | os.PathLike) -> dict[str, int]:
    """How many tensors of each type (F32, Q8_0, Q4_K, ...) the GGUF file holds, most frequent first."""
    reader, _ = _open(Path(path))
    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def read_gguf_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig a GGUF file describes (reads the metadata and the small rope_freqs tensor only)."""
    path = Path(path)
    reader, meta = _open(path)
    return _config(reader, meta, path)


def _config(reader: Any, meta: dict[str, Any], path: Path) -> ModelConfig:
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    factors = _dequantize(freqs, path).numpy() if freqs is not None else None
    return config_from_gguf(meta, _shapes(reader), factors, str(path))


def load_gguf(
    path: str | os.PathLike, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu"
) -> Transformer:
    """An lmforge model from a GGUF file; dtype None (or "auto") gives float32, the dequantized values."""
    from lmforge.config import dtype_from_name

    path = Path(path)
    reader, meta = _open(path)
    target = dtype if isinstance(dtype, torch.dtype) else torch.float32
    if isinstance(dtype, str) and dtype != "auto":
        target = dtype_from_name(dtype)
    model = _load(reader, meta, path, target)
    return model.to(device) if str(device) != "cpu" else model


def _load(reader: Any, meta: dict[str, Any], path: Path, dtype: torch.dtype) -> Transformer:
    config = _config(reader, meta, path)
    with torch.device("meta"):
        model = Transformer(config, device="meta")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapping = to_gguf_names(list(expected), config.family)
    tensors = {t.name: t for t in reader.tensors}
    missing = [g for g in mapping if g not in tensors]
    unexpected = [g for g in tensors if g not in mapping and g != gguf_name(config.family, *ROPE_FREQS)]
    if missing or unexpected:
        found = {"missing": missing, "unexpected": unexpected}
        parts = [f"{len(x)} {k} ({', '.join(x[:5])}{', ...' if len(x) > 5 else ''})" for k, x in found.items() if x]
        raise LmforgeError(f"{path}: the tensors do not match the file's metadata: {'; '.join(parts)}.")
    state: dict[str, torch.Tensor] = {}
    for gname, ours in mapping.items():
        t = _dequantize(tensors[gname], path)
        heads = permuted_heads(ours[0], config.family, config.num_heads, config.num_kv_heads)
        if heads is not None:
            t = from_llamacpp_rows(t, heads)
        for name, part in zip(ours, t.chunk(len(ours)) if len(ours) > 1 else (t,), strict=True):
            if tuple(part.shape) != expected[name]:
                raise LmforgeError(
                    f"{path}: tensor {gname} has shape {list(t.shape)}, the metadata implies "
                    f"{[expected[name][0] * len(ours), *expected[name][1:]]}; the file is inconsistent."
                )
            state[name] = part.to(dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def load_gguf_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer embedded in a GGUF file (byte-level BPE vocabularies)."""
    from lmforge.checkpoint.gguf_tokenizer import tokenizer_from_gguf

    path = Path(path)
    _, meta = _open(path)
    tokenizer = tokenizer_from_gguf(meta, str(path))
    if tokenizer is None:
        raise LmforgeError(f"{path} holds no tokenizer (tokenizer.ggml.model is 'none'); load one from elsewhere.")
    return tokenizer


def load_gguf_with_tokenizer(path: str | os.PathLike) -> tuple[Transformer, Tokenizer | None]:
    """The fp32 model and the embedded tokenizer (None when the file has no vocabulary), from one read."""
    from lmforge.checkpoint.gguf_tokenizer import tokenizer_from_gguf

    path = Path(path)
    reader, meta = _open(path)
    return _load(reader, meta, path, torch.float32), tokenizer_from_gguf(meta, str(path))


def gguf_to_hf(
    path: str | os.PathLike, out: str | os.PathLike, *, dtype: torch.dtype | None = None, **save_options: Any
) -> tuple[Path, bool]:
    """Write a GGUF file as an HF directory (config.json, model.safetensors, tokenizer files with the
    file's chat template); returns (the directory, whether a tokenizer was written). `save_options` go
    to `save_pretrained` (max_shard_size)."""
    from lmforge.checkpoint.hf import save_pretrained

    model, tokenizer = load_gguf_with_tokenizer(path)
    extra: dict[str, str] = {}
    if tokenizer is not None:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save(tmp)
            extra = {f.name: f.read_text(encoding="utf-8") for f in sorted(Path(tmp).iterdir())}
    return save_pretrained(model, out, dtype=dtype, extra_files=extra, **save_options), tokenizer is not None
