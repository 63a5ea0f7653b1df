"""Cleaning a corpus: Unicode normalisation, line endings, control characters, length filters, exact and
near-duplicate removal, with a report of what was removed and why.

Near-duplicates are found with MinHash + LSH (Broder, "On the resemblance and containment of documents",
1997) over word 5-gram shingles, as in the GPT-3 and Gopher data pipelines, using `datasketch`.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmforge.data.sources import Document, DocumentStream
from lmforge.errors import LmforgeError, suggest
from lmforge.progress import Progress

NORMALIZE_FORMS = ("NFC", "NFKC", "none")
# Removal reasons, in the order they are checked (a document is counted under the first that applies).
REASONS = ("too_short", "too_long", "exact_duplicate", "near_duplicate")
_REASON_TEXT = {
    "too_short": "empty or too short",
    "too_long": "too long",
    "exact_duplicate": "exact duplicate",
    "near_duplicate": "near duplicate",
    "skipped": "binary/undecodable files",
}

# C0 and C1 control characters except \t and \n (\r is turned into \n first), plus lone surrogates,
# which JSON escapes can produce and which cannot be encoded as UTF-8.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")

SHINGLE_WORDS = 5
NUM_PERM = 128


@dataclass
class CleanReport:
    """What cleaning did: documents and UTF-8 bytes kept, and removed per reason.

    Bytes are those of the cleaned text (`input_bytes` of the raw text); for skipped files, their size on disk.
    """

    input_documents: int = 0
    input_bytes: int = 0
    kept_documents: int = 0
    kept_bytes: int = 0
    removed_documents: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    removed_bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    skipped_files: int = 0
    skipped_bytes: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def remove(self, reason: str, nbytes: int) -> None:
        self.removed_documents[reason] += 1
        self.removed_bytes[reason] += nbytes

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (stored as "clean" in index.json)."""
        return {
            "input_documents": self.input_documents,
            "input_bytes": self.input_bytes,
            "kept_documents": self.kept_documents,
            "kept_bytes": self.kept_bytes,
            "removed_documents": dict(self.removed_documents),
            "removed_bytes": dict(self.removed_bytes),
            "skipped_files": self.skipped_files,
            "skipped_bytes": self.skipped_bytes,
            "skipped_examples": list(self.skipped_examples),
            "settings": dict(self.settings),
        }

    def format(self) -> str:
        """A short human summary, one line per non-zero count."""
        lines = [
            f"read {self.input_documents:,} documents ({_human_bytes(self.input_bytes)}), "
            f"kept {self.kept_documents:,} ({_human_bytes(self.kept_bytes)})"
        ]
        for reason in REASONS:
            n = self.removed_documents[reason]
            if n:
                lines.append(f"  removed {n:,} {_REASON_TEXT[reason]} ({_human_bytes(self.removed_bytes[reason])})")
        if self.skipped_files:
            examples = ", ".join(self.skipped_examples[:3])
            more = ", ..." if self.skipped_files > 3 else ""
            lines.append(
                f"  skipped {self.skipped_files:,} {_REASON_TEXT['skipped']} "
                f"({_human_bytes(self.skipped_bytes)}: {examples}{more})"
            )
        return "\n".join(lines)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _check_normalize(normalize: str | None) -> str:
    form = "none" if normalize is None else normalize
    for f in NORMALIZE_FORMS:
        if form.lower() == f.lower():
            return f
    raise LmforgeError(
        f"unknown normalization {normalize!r}; choose one of {', '.join(NORMALIZE_FORMS)}."
        f"{suggest(form.upper(), NORMALIZE_FORMS)}"
    )


def clean_text(text: str, normalize: str = "NFC") -> str:
    """One document's cleaned text: normalised, \\r\\n and lone \\r -> \\n, control characters removed."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    if normalize != "none" and not unicodedata.is_normalized(normalize, text):
        text = unicodedata.normalize(normalize, text)
    return text


def _shingles(text: str) -> set[bytes]:
    """Word 5-gram shingles (lower-cased, whitespace-split); a shorter text is one shingle."""
    words = text.lower().split()
    if len(words) <= SHINGLE_WORDS:
        return {" ".join(words).encode()}
    return {" ".join(words[i : i + SHINGLE_WORDS]).encode() for i in range(len(words) - SHINGLE_WORDS + 1)}


class _NearDuplicateIndex:
    """MinHash signatures in an LSH index; a document is a near duplicate of an earlier kept one when LSH
    proposes it and the estimated Jaccard similarity of their shingle sets reaches the threshold."""

    def __init__(self, threshold: float) -> None:
        try:
            from datasketch import MinHash, MinHashLSH
        except ImportError:
            raise LmforgeError(
                "near-duplicate removal needs datasketch: `pip install datasketch` "
                "(or the extra: `pip install lmforge[data]`), or turn near_dedup off."
            ) from None
        self._minhash = MinHash
        self.threshold = threshold
        self.lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
        # LSH candidates are only probable matches; the kept signatures let us check the estimate.
        self.signatures: list[np.ndarray] = []

    def is_duplicate_else_add(self, text: str) -> bool:
        m = self._minhash(num_perm=NUM_PERM)
        m.update_batch(list(_shingles(text)))
        for key in self.lsh.query(m):
            if float(np.mean(self.signatures[key] == m.hashvalues)) >= self.threshold:
                return True
        self.lsh.insert(len(self.signatures), m)
        self.signatures.append(m.hashvalues.copy())
        return False


def clean_documents(
    docs: Iterable[Document | str],
    normalize: str = "NFC",
    dedup: bool = True,
    near_dedup: bool = False,
    near_dedup_threshold: float = 0.8,
    min_chars: int = 1,
    max_chars: int | None = None,
    progress: bool = False,
) -> tuple[list[str], CleanReport]:
    """Clean documents and drop the unwanted ones; returns the kept texts (in input order) and a report.

    Each text is cleaned (`clean_text`), then checked in order: empty (whitespace only) or shorter than
    `min_chars` characters, longer than `max_chars`, exact duplicate of an earlier kept text (by hash),
    near duplicate (MinHash + LSH at `near_dedup_threshold` estimated Jaccard similarity of word 5-grams;
    needs `datasketch`). Files skipped by a `DocumentStream` are counted in the report too.
    """
    form = _check_normalize(normalize)
    if min_chars < 0 or (max_chars is not None and max_chars < max(min_chars, 1)):
        raise LmforgeError(f"bad length filter min_chars={min_chars}, max_chars={max_chars}; need 0 <= min <= max.")
    if near_dedup and not 0.0 < near_dedup_threshold <= 1.0:
        raise LmforgeError(f"near_dedup_threshold must be in (0, 1], got {near_dedup_threshold}.")
    near = _NearDuplicateIndex(near_dedup_threshold) if near_dedup else None
    report = CleanReport(
        settings=dict(
            normalize=form,
            dedup=dedup,
            near_dedup=near_dedup,
            near_dedup_threshold=near_dedup_threshold,
            min_chars=min_chars,
            max_chars=max_chars,
        )
    )
    seen: set[bytes] = set()
    kept: list[str] = []
    with Progress(None, "clean", unit="doc", enabled=progress) as bar:
        for doc in docs:
            raw = doc.text if isinstance(doc, Document) else doc
            report.input_documents += 1
            report.input_bytes += len(raw.encode("utf-8", "surrogatepass"))
            text = clean_text(raw, form)
            nbytes = len(text.encode("utf-8"))
            reason = _reject_reason(text, min_chars, max_chars)
            if reason is None and dedup:
                digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
                if digest in seen:
                    reason = "exact_duplicate"
                else:
                    seen.add(digest)
            if reason is None and near is not None and near.is_duplicate_else_add(text):
                reason = "near_duplicate"
            if reason is None:
                kept.append(text)
                report.kept_documents += 1
                report.kept_bytes += nbytes
            else:
                report.remove(reason, nbytes)
            bar.update(1, kept=report.kept_documents)
    if isinstance(docs, DocumentStream):
        report.skipped_files = len(docs.skipped)
        report.skipped_bytes = sum(s.size for s in docs.skipped)
        report.skipped_examples = [f"{s.path} ({s.reason})" for s in docs.skipped[:10]]
    return kept, report


def _reject_reason(text: str, min_chars: int, max_chars: int | None) -> str | None:
    if not text.strip() or len(text) < min_chars:
        return "too_short"
    if max_chars is not None and len(text) > max_chars:
        return "too_long"
    return None
