"""Reading corpus inputs: files, directories and glob patterns -> a stream of text documents.

A plain text file (any extension) is one document; `*.jsonl` / `*.jsonl.gz` give one document per line
and `*.parquet` one per row, both from a text field. Files that are not text (NUL bytes, or not valid
UTF-8) are skipped and counted, so that pointing lmforge at a source tree with images in it just works.
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import json
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError, suggest

_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class Document:
    """One document: its text and where it came from ("path", "path:line" or "path:row")."""

    text: str
    source: str


@dataclass(frozen=True)
class SkippedFile:
    """A file that was not read as text, with the reason and its size on disk."""

    path: str
    reason: str
    size: int


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _walk(directory: Path, include: list[str] | None) -> list[Path]:
    """Files under `directory`, recursively and sorted; hidden entries (.git, .cache, ...) are left out."""
    found: list[Path] = []
    for root, dirs, files in os.walk(directory):
        # Pruning in place stops os.walk from descending into hidden directories such as .git.
        dirs[:] = sorted(d for d in dirs if not _is_hidden(d))
        for name in sorted(files):
            if _is_hidden(name):
                continue
            if include and not any(fnmatch.fnmatch(name, pat) for pat in include):
                continue
            found.append(Path(root) / name)
    return found


def _expand(item: str, include: list[str] | None) -> list[Path]:
    """The files one input names: a file, a directory (recursive) or a glob pattern."""
    path = Path(os.path.expanduser(item))
    if path.is_file():
        return [path]
    if path.is_dir():
        return _walk(path, include)
    if _GLOB_CHARS.intersection(item):
        out: list[Path] = []
        for match in sorted(glob.glob(os.path.expanduser(item), recursive=True)):
            p = Path(match)
            out.extend(_walk(p, include) if p.is_dir() else [p] if p.is_file() else [])
        return out
    raise LmforgeError(
        f"input {item!r} does not exist; pass files, directories or quoted glob patterns such as 'data/**/*.txt'."
    )


def resolve_inputs(inputs: Iterable[str], include: list[str] | None = None) -> list[Path]:
    """Every file the inputs name, in a deterministic order, each once.

    Raises LmforgeError when an input path does not exist or when nothing matched at all.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [str(inputs)]  # a lone path is an easy slip; treat it as a list of one
    inputs = [str(i) for i in inputs]
    if not inputs:
        raise LmforgeError("no inputs given; pass at least one file, directory or glob pattern.")
    seen: set[Path] = set()
    files: list[Path] = []
    for item in inputs:
        for f in _expand(item, include):
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                files.append(f)
    if not files:
        where = ", ".join(repr(i) for i in inputs)
        filt = f" with file names matching {include}" if include else ""
        raise LmforgeError(
            f"no input files found: searched {where}{filt} (hidden files and directories are skipped). "
            "Check the paths and the --include patterns."
        )
    return files


def _read_text_file(path: Path) -> str | SkippedFile:
    data = path.read_bytes()
    if b"\x00" in data:
        return SkippedFile(str(path), "binary (NUL bytes)", len(data))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return SkippedFile(str(path), "not valid UTF-8", len(data))
    return text.removeprefix("\ufeff")  # a UTF-8 byte order mark is an encoding artefact, not text


def _field(record: Any, text_field: str, where: str) -> str:
    """The text field of one JSON record, or a clear error naming the record's place."""
    if not isinstance(record, dict):
        raise LmforgeError(f"{where}: expected a JSON object with a {text_field!r} field, got {type(record).__name__}.")
    if text_field not in record:
        keys = ", ".join(map(repr, list(record)[:10])) or "none"
        raise LmforgeError(
            f"{where}: no {text_field!r} field (fields: {keys}).{suggest(text_field, record)} "
            "Pass the right field name with --text-field."
        )
    value = record[text_field]
    if not isinstance(value, str):
        raise LmforgeError(f"{where}: field {text_field!r} is {type(value).__name__}, expected a string.")
    return value


def _read_jsonl(path: Path, text_field: str) -> Iterator[Document]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                where = f"{path}:{lineno}"
                if not raw.strip():
                    continue  # blank lines (e.g. a trailing newline) carry no record
                try:
                    record = json.loads(raw)
                except UnicodeDecodeError as e:
                    raise LmforgeError(
                        f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                        "re-encode the file as UTF-8."
                    ) from None
                except json.JSONDecodeError as e:
                    raise LmforgeError(
                        f"{where}: malformed JSON ({e.msg} at column {e.colno}); fix or remove that line."
                    ) from None
                yield Document(_field(record, text_field, where), where)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise LmforgeError(f"{path}: corrupt or truncated gzip file ({e}); re-create it.") from None


def _read_parquet(path: Path, text_field: str) -> Iterator[Document]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise LmforgeError(
            f"reading {path} needs pyarrow: `pip install pyarrow` (or the extra: `pip install lmforge[data]`)."
        ) from None
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise LmforgeError(f"{path}: not a readable parquet file ({e}).") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise LmforgeError(
            f"{path}: no column {text_field!r} (columns: {', '.join(names)}).{suggest(text_field, names)} "
            "Pass the right column with --text-field."
        )
    col_type = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
        raise LmforgeError(f"{path}: column {text_field!r} has type {col_type}, expected a string column.")
    row = 0
    # Batches keep memory bounded for large files; only the text column is read.
    for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            row += 1
            if value is None:
                raise LmforgeError(f"{path}: row {row} has a null {text_field!r}; drop or fill null rows.")
            yield Document(value, f"{path}:row{row}")


def _read_file(path: Path, text_field: str) -> Iterator[Document | SkippedFile]:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        yield from _read_jsonl(path, text_field)
    elif name.endswith(".parquet"):
        yield from _read_parquet(path, text_field)
    else:
        result = _read_text_file(path)
        yield result if isinstance(result, SkippedFile) else Document(result, str(path))


class DocumentStream(Iterator[Document]):
    """An iterator of documents that also records the files it skipped (`skipped`), as it goes.

    `clean_documents` reads `skipped` after consuming the stream, so skipped files show in its report.
    """

    def __init__(self, files: list[Path], text_field: str = "text") -> None:
        self.files = files
        self.text_field = text_field
        self.skipped: list[SkippedFile] = []
        self._it = self._generate()

    def _generate(self) -> Iterator[Document]:
        for path in self.files:
            for item in _read_file(path, self.text_field):
                if isinstance(item, SkippedFile):
                    self.skipped.append(item)
                else:
                    yield item

    def __iter__(self) -> DocumentStream:
        return self

    def __next__(self) -> Document:
        return next(self._it)


def iter_documents(inputs: list[str], text_field: str = "text", include: list[str] | None = None) -> DocumentStream:
    """Documents from files, directories (recursive) and glob patterns, in a deterministic order.

    Text files of any extension are one document each; binary or non-UTF-8 files are skipped and listed
    in the stream's `skipped`. `*.jsonl`, `*.jsonl.gz` and `*.parquet` give one document per line/row from
    `text_field`. `include` filters the files found in directories by name (e.g. ["*.py", "*.md"]).
    Inputs are resolved immediately, so a wrong path fails here rather than at the first `next()`.
    """
    return DocumentStream(resolve_inputs(inputs, include), text_field)
