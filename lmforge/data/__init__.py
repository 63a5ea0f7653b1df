"""The data pipeline: read a corpus, clean it, tokenize it into flat token shards, and serve packed batches.

docs = iter_documents(["corpus/"], include=["*.md"])      # sources.py
texts, report = clean_documents(docs, near_dedup=True)    # clean.py
prepare(["corpus/"], tokenizer, "data/")                  # shards.py: all of the above + shards + index
loader = PackedLoader(TokenShards("data/"), 16, 256)      # loader.py: infinite, resumable batches
"""

from lmforge.data.clean import CleanReport, clean_documents, clean_text
from lmforge.data.config import PrepareConfig, SourceConfig, TokenizerTrainConfig
from lmforge.data.loader import PackedLoader, position_ids, sequential_batches
from lmforge.data.shards import (
    PrepareReport,
    SplitReport,
    TokenizerLike,
    TokenShards,
    has_split,
    prepare,
)
from lmforge.data.sources import Document, DocumentStream, SkippedFile, iter_documents, resolve_inputs
from lmforge.data.split import split_indices

__all__ = [
    "CleanReport",
    "Document",
    "DocumentStream",
    "PackedLoader",
    "PrepareConfig",
    "PrepareReport",
    "SkippedFile",
    "SourceConfig",
    "SplitReport",
    "TokenShards",
    "TokenizerLike",
    "TokenizerTrainConfig",
    "clean_documents",
    "clean_text",
    "has_split",
    "iter_documents",
    "position_ids",
    "prepare",
    "resolve_inputs",
    "sequential_batches",
    "split_indices",
]
