"""Reading JSONL files with errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-empty line; every line must be a JSON object in UTF-8."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise LmforgeError(f"{path} {what}; pass a JSONL file (one JSON object per line).")
    # Bytes first, decoded line by line, so that a bad byte is reported with its line. bytes.splitlines
    # breaks lines where text mode's universal newlines do (\n, \r\n, \r), so the line numbers agree.
    rows = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise LmforgeError(
                f"{path}:{number}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                "re-encode the file as UTF-8."
            ) from None
        if number == 1:
            line = line.removeprefix("\ufeff")  # a byte order mark is an encoding artefact, not JSON
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{path}:{number}: not valid JSON ({e.msg}); fix that line.") from None
        if not isinstance(obj, dict):
            raise LmforgeError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}.")
        rows.append((number, obj))
    if not rows:
        raise LmforgeError(f"{path} has no examples.")
    return rows
