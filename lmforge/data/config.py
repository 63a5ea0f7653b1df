"""The options of `lmforge tokenizer train` and `lmforge prepare`, declared once (lmforge/options.py)."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.chat_formats import FORMATS
from lmforge.errors import LmforgeError
from lmforge.options import option, validate

NORMALIZATIONS = ("NFC", "NFKC", "none")


@dataclass(frozen=True)
class SourceConfig:
    """How input files are read (text, JSONL, Parquet, directories, globs)."""

    text_field: str = option("text", "field holding the text in JSONL/Parquet")
    include: tuple[str, ...] = option((), "only files matching this glob inside directories (repeatable)", split=False)

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True)
class PrepareConfig(SourceConfig):
    """Cleaning, deduplication, the validation split and the shard size of `lmforge prepare`."""

    val_fraction: float = option(0.01, "share of documents held out for validation")
    seed: int = option(0, "seed of the train/validation split")
    normalize: str = option("NFC", "Unicode normalisation", choices=NORMALIZATIONS)
    dedup: bool = option(True, "drop exact duplicate documents")
    near_dedup: bool = option(False, "also drop near duplicates (MinHash; needs datasketch)")
    near_dedup_threshold: float = option(0.8, "estimated Jaccard similarity above which a document is a near duplicate")
    min_chars: int = option(1, "drop documents shorter than this many characters")
    max_chars: int | None = option(None, "drop documents longer than this many characters")
    shard_tokens: int = option(50_000_000, "tokens per shard file")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shard_tokens < 1:
            raise LmforgeError(f"shard_tokens must be positive, got {self.shard_tokens}.")


@dataclass(frozen=True)
class TokenizerTrainConfig(SourceConfig):
    """What `lmforge tokenizer train` builds: a byte-level BPE with a chat format's special tokens."""

    vocab_size: int = option(4096, "total vocabulary, special tokens included")
    chat_format: str = option("llama3", "chat format and its special tokens", choices=tuple(FORMATS))
    min_frequency: int = option(2, "minimum count of a pair to become a merge")
