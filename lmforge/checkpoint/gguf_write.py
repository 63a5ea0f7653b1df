"""Export: an lmforge model (and its tokenizer) -> one GGUF file that llama.cpp loads.

Tensors are named and laid out as llama.cpp's converter does (gguf_names.py), hyperparameters written
under llama.cpp's keys (gguf_config.py), the tokenizer embedded (gguf_tokenizer.py). With a quantized
type, the 2-D weights whose rows split into whole blocks are quantized by the gguf package; norms, biases,
rope_freqs and any row that does not split stay float32, as llama.cpp's converter keeps them. The file is
streamed one tensor at a time into a temporary sibling that replaces `path` only when complete.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.atomic import replace_file
from lmforge.checkpoint.gguf_config import rope_freqs, write_config
from lmforge.checkpoint.gguf_names import (
    GGUF_ARCHS,
    ROPE_FREQS,
    gguf_name,
    import_gguf,
    permuted_heads,
    to_gguf_names,
    to_llamacpp_rows,
)
from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer

QUANTS = ("f32", "f16", "q8_0", "q4_0")


def _tensors(model: Transformer) -> dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]]:
    """GGUF name -> (shape, a function giving the tensor in fp32 and llama.cpp's layout), in file order."""
    c = model.config
    state = model.state_dict()
    out: dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]] = {}
    freqs = rope_freqs(c) if c.family == "llama" else None
    if freqs is not None:
        out[gguf_name(c.family, *ROPE_FREQS)] = (tuple(freqs.shape), lambda: freqs)
    for name, parts in to_gguf_names(list(state), c.family).items():

        def get(parts: tuple[str, ...] = parts) -> torch.Tensor:
            t = torch.cat([state[p] for p in parts]) if len(parts) > 1 else state[parts[0]]
            heads = permuted_heads(parts[0], c.family, c.num_heads, c.num_kv_heads)
            t = t.detach().to("cpu", torch.float32)
            return to_llamacpp_rows(t, heads) if heads is not None else t

        first = tuple(state[parts[0]].shape)
        out[name] = ((sum(state[p].shape[0] for p in parts), *first[1:]), get)  # fused: rows add up
    return out


def _ggml_type(gguf: Any, quant: str, shape: tuple[int, ...]) -> Any:
    """The type a tensor of `shape` (numpy order) is stored in for `quant`."""
    T = gguf.GGMLQuantizationType
    if quant == "f32" or len(shape) != 2:
        return T.F32
    qtype = {"f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[quant]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block == 0 else T.F32


def save_gguf(
    model: Transformer,
    path: str | os.PathLike,
    *,
    quant: str = "f32",
    tokenizer: Tokenizer | None = None,
    name: str | None = None,
) -> Path:
    """Write `model` as a GGUF file for llama.cpp (llama, qwen2 and glm4 families).

    `quant` is f32, f16, q8_0 or q4_0 (weights only; see the module docstring). `tokenizer` is embedded
    when given; without one the file says tokenizer model "none", which llama.cpp loads for embeddings
    and token ids only. Tied embeddings are written once (no output.weight), as llama.cpp expects.
    """
    gguf = import_gguf()
    if quant not in QUANTS:
        raise LmforgeError(f"unknown GGUF quant type {quant!r}; use one of {', '.join(QUANTS)}.")
    c = model.config
    tensors = _tensors(model)  # first: it refuses families llama.cpp has no architecture for here
    T, F = gguf.GGMLQuantizationType, gguf.LlamaFileType
    file_type = {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "q8_0": F.MOSTLY_Q8_0, "q4_0": F.MOSTLY_Q4_0}[quant]

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, GGUF_ARCHS[c.family])
        try:
            writer.add_name(name or Path(path).stem)
            writer.add_file_type(int(file_type))
            if quant not in ("f32", "f16"):
                writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            write_config(writer, c)
            if tokenizer is not None:
                from lmforge.checkpoint.gguf_tokenizer import write_tokenizer

                write_tokenizer(writer, tokenizer, c.vocab_size, c.family)
            else:
                writer.add_tokenizer_model("none")
                # The config's ids still travel (llama.cpp ignores them without a vocabulary; import reads them).
                for add, token_id in (
                    (writer.add_bos_token_id, c.bos_token_id),
                    (writer.add_eos_token_id, c.eos_token_id[0] if c.eos_token_id else None),
                    (writer.add_pad_token_id, c.pad_token_id),
                ):
                    if token_id is not None:
                        add(token_id)
            # Tensor infos (names, shapes, types, sizes) come before the data: plan every tensor from its
            # shape, then stream the data one tensor at a time.
            kinds = []
            for gname, (shape, _) in tensors.items():
                kind = _ggml_type(gguf, quant, shape)
                block, size = gguf.GGML_QUANT_SIZES[kind]
                nbytes = int(np.prod(shape)) // block * size
                writer.add_tensor_info(gname, shape, np.float32, nbytes, raw_dtype=kind)
                kinds.append(kind)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for (_, get), kind in zip(tensors.values(), kinds, strict=True):
                data = get().numpy()
                writer.write_tensor_data(data if kind == T.F32 else gguf.quants.quantize(data, kind))
        finally:
            writer.close()

    return replace_file(path, write)
