"""Reading JSONL files with errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-empty line; every line must be a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{path} does not exist; pass a JSONL file (one JSON object per line).")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
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
