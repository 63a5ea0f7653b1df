"""Loading a model for use: a checkpoint directory, or a run directory standing for its latest checkpoint,
with the tokenizer stored beside the weights, in the precision chosen for this machine."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from lmforge.checkpoint import load_pretrained
from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.options import option, validate
from lmforge.runtime import DTYPE_CHOICES, DTYPE_HELP
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoints import resolve_model_dir


@dataclass(frozen=True)
class LoadOptions:
    """How a model is loaded for decoding, chat, scoring and benchmarks."""

    dtype: str = option(
        "auto", f"weights' precision: {DTYPE_HELP}; auto keeps the stored one where it is fast", choices=DTYPE_CHOICES
    )

    def __post_init__(self) -> None:
        validate(self)


def describe_precision(model: Transformer, requested: str) -> str:
    """`precision: float32 (auto: stored bfloat16 is slow here)`-style line for the commands to print."""
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    stored = model.config.dtype
    if requested != "auto":
        return f"precision: {dtype} (as asked)"
    why = "as stored" if dtype == stored else f"auto: the stored {stored} is slow on this machine"
    return f"precision: {dtype} ({why})"


def load_model_and_tokenizer(
    spec: str | os.PathLike, dtype: str = "auto", need_tokenizer: bool = True, device: str = "cpu"
) -> tuple[Transformer, Any]:
    """(model in eval mode, Tokenizer or None). dtype: auto (the stored one unless slow here), float32 or
    bfloat16; see lmforge.runtime.inference_dtype."""
    path = resolve_model_dir(spec)
    model = load_pretrained(path, dtype=dtype, device=device)
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_pretrained(path)
    elif need_tokenizer:
        raise LmforgeError(f"{path} has no tokenizer.json; save the tokenizer next to the weights.")
    return model, tokenizer
