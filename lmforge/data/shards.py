"""Token shards: `prepare` (clean -> split -> tokenize -> flat shards + index.json) and `TokenShards` (read).

On disk (format "lmforge-tokens-v1"), a data directory holds
    index.json               dtype, vocab_size, eos_token_id, per split: shards, tokens, documents, bytes
    train-00000.bin, ...     raw little-endian token ids, every document followed by EOS
    val-00000.bin, ...
    val.txt                  the validation documents' cleaned text joined with "\\n" (for compression baselines)
"bytes" is the UTF-8 size of a split's cleaned documents (without the joining newlines), the denominator
of bits-per-byte. A shard may end in the middle of a document; a shard's "documents" counts the
documents that end in it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np

from lmforge.atomic import write_directory
from lmforge.data.clean import CleanReport, _human_bytes, clean_documents
from lmforge.data.config import PrepareConfig
from lmforge.data.sources import DocumentStream, resolve_inputs
from lmforge.data.split import check_val_fraction, split_indices
from lmforge.errors import LmforgeError, suggest
from lmforge.progress import Progress

FORMAT = "lmforge-tokens-v1"
INDEX = "index.json"
TOKENIZER_DIR = "tokenizer"
VAL_TEXT = "val.txt"
SPLITS = ("train", "val")
# Documents per encode_batch call: large enough for the Rust tokenizer's thread pool to pay off.
ENCODE_BATCH_DOCS = 1024
ENCODE_BATCH_CHARS = 8_000_000


class TokenizerLike(Protocol):
    """What `prepare` needs from a tokenizer (lmforge.Tokenizer and HF `tokenizers` wrappers fit)."""

    eos_token_id: int
    vocab_size: int

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab < 65536), else uint32; always little-endian."""
    if vocab_size <= 0 or vocab_size > 2**32:
        raise LmforgeError(f"vocab_size {vocab_size} is out of range (1 .. 2**32).")
    return np.dtype("<u2") if vocab_size < 2**16 else np.dtype("<u4")


# --- Reports -----------------------------------------------------------------------------------------
@dataclass
class SplitReport:
    """One split as written: documents, tokens, UTF-8 bytes of its cleaned text, and its shard files."""

    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    shards: list[dict[str, Any]] = field(default_factory=list)

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"shards": self.shards, "tokens": self.tokens, "documents": self.documents, "bytes": self.bytes}


@dataclass
class PrepareReport:
    """What `prepare` wrote; `format()` is the summary the CLI prints."""

    out_dir: Path
    dtype: str
    vocab_size: int
    eos_token_id: int
    splits: dict[str, SplitReport]
    clean: CleanReport
    seconds: float = 0.0

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.splits.values())

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.splits.values())

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.splits.values())

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else 0.0

    def format(self) -> str:
        """A multi-line human summary: cleaning, then per split documents/tokens/bytes, then where it went."""
        lines = [self.clean.format()]
        for name, s in self.splits.items():
            lines.append(
                f"{name:>5}: {s.documents:,} documents, {s.tokens:,} tokens, {_human_bytes(s.bytes)} "
                f"({s.bytes_per_token:.2f} bytes/token), {len(s.shards)} shard(s)"
            )
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        lines.append(
            f"wrote {self.tokens:,} {self.dtype} tokens to {self.out_dir} in {self.seconds:.1f}s ({rate:,.0f} tokens/s)"
        )
        return "\n".join(lines)


# --- Writing -----------------------------------------------------------------------------------------
class _ShardWriter:
    """Appends token arrays to {split}-NNNNN.bin files of at most `shard_tokens` tokens each."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.report = SplitReport()
        self._file: BinaryIO | None = None
        self._in_shard = 0
        self._docs_in_shard = 0

    def write(self, tokens: np.ndarray, doc_ends: np.ndarray, nbytes: int) -> None:
        """Append `tokens`; `doc_ends` are the offsets just past each document's EOS within `tokens`."""
        self.report.documents += len(doc_ends)
        self.report.bytes += nbytes
        start = 0
        while start < len(tokens):
            if self._file is None:
                self._open()
            n = min(len(tokens) - start, self.shard_tokens - self._in_shard)
            tokens[start : start + n].astype(self.dtype, copy=False).tofile(self._file)
            # Documents whose end falls in (start, start + n] end in this shard.
            self._docs_in_shard += int(
                np.searchsorted(doc_ends, start + n, "right") - np.searchsorted(doc_ends, start, "right")
            )
            self._in_shard += n
            self.report.tokens += n
            start += n
            if self._in_shard == self.shard_tokens:
                self._close()

    def _open(self) -> None:
        name = f"{self.split}-{len(self.report.shards):05d}.bin"
        self._file = open(self.directory / name, "wb")  # noqa: SIM115 (closed in _close)
        self.report.shards.append({"file": name, "tokens": 0, "documents": 0})

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self.report.shards[-1].update(tokens=self._in_shard, documents=self._docs_in_shard)
            self._in_shard = self._docs_in_shard = 0

    def finish(self) -> SplitReport:
        self._close()
        return self.report


def _encode(tokenizer: TokenizerLike, texts: list[str], eos: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of `texts`, each followed by EOS, as one int64 array, and the document end offsets."""
    encoded = tokenizer.encode_batch(texts)
    if len(encoded) != len(texts):
        raise LmforgeError(f"tokenizer.encode_batch returned {len(encoded)} results for {len(texts)} texts.")
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
    flat = np.empty(int(lengths.sum()), dtype=np.int64)
    ends = np.cumsum(lengths)
    for ids, end, n in zip(encoded, ends, lengths, strict=True):
        flat[end - n : end - 1] = ids
        flat[end - 1] = eos
    lo, hi = (int(flat.min()), int(flat.max())) if flat.size else (0, 0)
    if lo < 0 or hi >= vocab_size:
        raise LmforgeError(
            f"the tokenizer produced id {hi if hi >= vocab_size else lo} outside [0, vocab_size={vocab_size}); "
            "its vocab_size is wrong or it is not the tokenizer you meant."
        )
    return flat, ends


def _batches(texts: Sequence[str]) -> list[tuple[int, int]]:
    """[start, stop) ranges of at most ENCODE_BATCH_DOCS documents and about ENCODE_BATCH_CHARS characters."""
    out, start, chars = [], 0, 0
    for i, t in enumerate(texts):
        chars += len(t)
        if i + 1 - start >= ENCODE_BATCH_DOCS or chars >= ENCODE_BATCH_CHARS:
            out.append((start, i + 1))
            start, chars = i + 1, 0
    if start < len(texts):
        out.append((start, len(texts)))
    return out


def _check_out_dir(out_dir: Path) -> None:
    """Refuse to replace anything that is not an earlier prepare output (or an empty directory)."""
    if out_dir.is_file():
        raise LmforgeError(f"output {out_dir} is a file; pass a directory path.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / INDEX).is_file():
        raise LmforgeError(
            f"output {out_dir} exists, is not empty and holds no {INDEX}; lmforge will not replace it. "
            "Choose a new directory or remove it first."
        )


def _write_split(
    tmp: Path,
    split: str,
    texts: list[str],
    tokenizer: TokenizerLike,
    dtype: np.dtype,
    shard_tokens: int,
    on_batch: Callable[[int, int], None],
) -> SplitReport:
    """Tokenize one split into its shards; `on_batch(documents, tokens)` is called after every batch."""
    writer = _ShardWriter(tmp, split, dtype, shard_tokens)
    try:
        for start, stop in _batches(texts):
            chunk = texts[start:stop]
            tokens, ends = _encode(tokenizer, chunk, tokenizer.eos_token_id, tokenizer.vocab_size)
            writer.write(tokens, ends, sum(len(t.encode("utf-8")) for t in chunk))
            on_batch(len(chunk), len(tokens))
    finally:
        report = writer.finish()  # closes the open shard file, also on failure
    return report


class _TokenizeProgress:
    """Progress in documents (with ETA), plus the token rate as a live field."""

    def __init__(self, bar: Progress) -> None:
        self.bar, self.tokens, self.start = bar, 0, time.perf_counter()

    def __call__(self, documents: int, tokens: int) -> None:
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self.bar.update(documents, tokens=f"{self.tokens:,}", tok_per_s=f"{rate:,.0f}")


def prepare(
    inputs: list[str],
    tokenizer: TokenizerLike,
    out_dir: str | os.PathLike,
    config: PrepareConfig | None = None,
    *,
    progress: bool = True,
    save_tokenizer: bool = True,
    **options: Any,
) -> PrepareReport:
    """Read, clean, split, tokenize and write a corpus as token shards in `out_dir`; returns a report.

    Options as `PrepareConfig` (lmforge/data/config.py), given as one or as keywords. Documents are split
    into train/val with a seeded permutation (`split_indices`), keep their input order within a split, are
    tokenized with `tokenizer.encode_batch` and each followed by `tokenizer.eos_token_id`. A tokenizer with
    a `save` method is stored in `out_dir/tokenizer`, where `lmforge pretrain` finds it. Everything is
    written to a temporary sibling directory that replaces `out_dir` only when complete: a failure leaves an
    earlier `out_dir` as it was and no temporary files.
    """
    if config is not None and options:
        raise LmforgeError("pass prepare's options either as a PrepareConfig or as keywords, not both.")
    cfg = config if config is not None else PrepareConfig(**options)
    val_fraction, seed, text_field, include = cfg.val_fraction, cfg.seed, cfg.text_field, list(cfg.include) or None
    shard_tokens = cfg.shard_tokens
    started = time.perf_counter()
    out_dir = Path(out_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    if tokenizer.eos_token_id is None:
        raise LmforgeError("the tokenizer has no EOS token; prepare puts one after every document: use one that has.")
    if not 0 <= tokenizer.eos_token_id < tokenizer.vocab_size:
        raise LmforgeError(
            f"eos_token_id {tokenizer.eos_token_id} is outside the vocabulary (0..{tokenizer.vocab_size - 1})."
        )
    check_val_fraction(val_fraction)  # before any work
    _check_out_dir(out_dir)

    files = _exclude_output(resolve_inputs(inputs, include), out_dir)
    texts, clean_report = clean_documents(
        DocumentStream(files, text_field),
        normalize=cfg.normalize,
        dedup=cfg.dedup,
        near_dedup=cfg.near_dedup,
        near_dedup_threshold=cfg.near_dedup_threshold,
        min_chars=cfg.min_chars,
        max_chars=cfg.max_chars,
        progress=progress,
    )
    if not texts:
        raise LmforgeError(
            f"no documents left to tokenize after cleaning:\n{clean_report.format()}\n"
            "Check the inputs, --text-field and the length filters."
        )
    train_idx, val_idx = split_indices(len(texts), val_fraction, seed)
    split_texts = {"train": [texts[i] for i in train_idx], "val": [texts[i] for i in val_idx]}
    del texts

    splits: dict[str, SplitReport] = {}

    def write(tmp: Path) -> None:
        with Progress(len(train_idx) + len(val_idx), "tokenize", unit="doc", enabled=progress) as bar:
            on_batch = _TokenizeProgress(bar)
            for name in SPLITS:
                splits[name] = _write_split(tmp, name, split_texts[name], tokenizer, dtype, shard_tokens, on_batch)
        (tmp / VAL_TEXT).write_text("\n".join(split_texts["val"]), encoding="utf-8", newline="")
        index = {
            "format": FORMAT,
            "dtype": dtype.name,
            "vocab_size": int(tokenizer.vocab_size),
            "eos_token_id": int(tokenizer.eos_token_id),
            "splits": {name: s.to_dict() for name, s in splits.items()},
            "clean": clean_report.to_dict(),
            "settings": {"val_fraction": val_fraction, "seed": seed, "text_field": text_field, "include": include},
        }
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        if save_tokenizer and hasattr(tokenizer, "save"):
            tokenizer.save(tmp / TOKENIZER_DIR)  # the shards' ids mean nothing without it

    write_directory(out_dir, write, owned=lambda name: True)  # an earlier output is replaced whole
    return PrepareReport(
        out_dir=out_dir,
        dtype=dtype.name,
        vocab_size=int(tokenizer.vocab_size),
        eos_token_id=int(tokenizer.eos_token_id),
        splits=splits,
        clean=clean_report,
        seconds=time.perf_counter() - started,
    )


def _exclude_output(files: list[Path], out_dir: Path) -> list[Path]:
    """Leave out files inside `out_dir`, so that re-running prepare never reads its own val.txt or index."""
    root = out_dir.resolve()
    kept = [f for f in files if not f.resolve().is_relative_to(root)]
    if not kept:
        raise LmforgeError(
            f"every input file is inside the output directory {out_dir}; pass the corpus, not the output."
        )
    return kept


# --- Reading -----------------------------------------------------------------------------------------
def _load_index(data_dir: Path) -> dict[str, Any]:
    run_prepare = f"`lmforge prepare CORPUS --tokenizer TOKENIZER --out {data_dir}`"
    if data_dir.is_file():
        raise LmforgeError(
            f"{data_dir} is a file, not a data directory written by `lmforge prepare`; tokenize it first with "
            f"`lmforge prepare {data_dir} --tokenizer TOKENIZER --out DATA_DIR` and pass DATA_DIR."
        )
    if not data_dir.is_dir():
        raise LmforgeError(f"data directory {data_dir} does not exist; create it with {run_prepare}.")
    path = data_dir / INDEX
    if not path.is_file():
        raise LmforgeError(
            f"{data_dir} is not a `lmforge prepare` output (it has no {INDEX}); if it holds the corpus, tokenize it "
            f"first with `lmforge prepare {data_dir} --tokenizer TOKENIZER --out DATA_DIR` and pass DATA_DIR."
        )
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmforgeError(f"{path} is not valid JSON ({e}); re-run `lmforge prepare`.") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        found = index.get("format") if isinstance(index, dict) else None
        raise LmforgeError(f"{path} has format {found!r}, expected {FORMAT!r}; re-run `lmforge prepare`.")
    return index


def has_split(data_dir: str | os.PathLike, split: str) -> bool:
    """Whether `data_dir` (written by `prepare`) has a split of that name with at least one token."""
    try:
        index = json.loads((Path(data_dir) / INDEX).read_text(encoding="utf-8"))
        info = index.get("splits", {}).get(split, {})
        return bool(info.get("tokens"))
    except (OSError, ValueError, AttributeError):  # no or broken index: TokenShards says what is wrong
        return False


class TokenShards:
    """Read side of a data directory: one split's shards, memory-mapped read-only, as one token stream.

    Attributes: num_tokens, num_documents, num_bytes (UTF-8 bytes of the cleaned text), vocab_size,
    eos_token_id, dtype, data_dir, split.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str = "train") -> None:
        self.data_dir = Path(data_dir)
        self.split = split
        index = _load_index(self.data_dir)
        splits = index.get("splits", {})
        if not isinstance(splits, dict):
            raise LmforgeError(
                f"{self.data_dir / INDEX} is invalid (its splits are not an object); re-run `lmforge prepare`."
            )
        if split not in splits:
            raise LmforgeError(
                f"{self.data_dir / INDEX} has no split {split!r} (splits: {', '.join(splits)}).{suggest(split, splits)}"
            )
        try:
            self.dtype = np.dtype(index["dtype"]).newbyteorder("<")
            self.vocab_size = int(index["vocab_size"])
            self.eos_token_id = int(index["eos_token_id"])
            info = splits[split]
            self.num_documents = int(info["documents"])
            self.num_bytes = int(info["bytes"])
            shards = [(str(s["file"]), int(s["tokens"])) for s in info["shards"]]
        except (KeyError, TypeError, ValueError) as e:
            raise LmforgeError(
                f"{self.data_dir / INDEX} is incomplete or invalid ({e!r}); re-run `lmforge prepare`."
            ) from None
        self._maps = [self._map(name, tokens) for name, tokens in shards if tokens > 0]
        sizes = [len(m) for m in self._maps]
        # offsets[k] is the stream position of shard k's first token.
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.num_tokens = int(self.offsets[-1])
        if self.num_tokens != int(info.get("tokens", self.num_tokens)):
            raise LmforgeError(
                f"{self.data_dir / INDEX}: split {split!r} says {info['tokens']} tokens but its shards hold "
                f"{self.num_tokens}; re-run `lmforge prepare`."
            )

    def _map(self, name: str, tokens: int) -> np.memmap:
        path = self.data_dir / name
        if not path.is_file():
            raise LmforgeError(f"shard {path} listed in {INDEX} is missing; copy it back or re-run `lmforge prepare`.")
        expected = tokens * self.dtype.itemsize
        actual = path.stat().st_size
        if actual != expected:
            raise LmforgeError(
                f"shard {path} has {actual} bytes, but {INDEX} says {tokens} {self.dtype.name} tokens "
                f"({expected} bytes); the file is truncated or from another run: re-run `lmforge prepare`."
            )
        return np.memmap(path, dtype=self.dtype, mode="r", shape=(tokens,))

    def __len__(self) -> int:
        return self.num_tokens

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the split's stream, across shard boundaries, as int64."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"read({start}, {length}) outside the {self.num_tokens} tokens of split {self.split!r}")
        out = np.empty(length, dtype=np.int64)
        pos, done = start, 0
        k = int(np.searchsorted(self.offsets, start, "right")) - 1
        while done < length:
            local = pos - int(self.offsets[k])
            n = min(length - done, len(self._maps[k]) - local)
            out[done : done + n] = self._maps[k][local : local + n]
            pos, done, k = pos + n, done + n, k + 1
        return out

    def __repr__(self) -> str:
        return (
            f"TokenShards({str(self.data_dir)!r}, split={self.split!r}: {self.num_tokens:,} {self.dtype.name} tokens, "
            f"{self.num_documents:,} documents, {len(self._maps)} shard(s))"
        )
