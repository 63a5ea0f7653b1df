"""metrics.jsonl: one JSON record per line ({"step": ..., "loss": ...} or validation records), appended as
training goes, so that every step appears exactly once however often the run was killed and resumed.

A resumed run first cuts the log back to the checkpoint's step: the steps after it are trained again and
logged again. A kill can tear the last line; that line is dropped too. The log is fsynced before every
checkpoint is committed, so a checkpoint never has steps the log lost.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lmforge.atomic import write_file


def cut_back(path: Path, step: int) -> int:
    """Keep the records with step <= `step` (and drop a torn last line), rewriting `path` atomically if
    anything goes. Returns how many records were dropped."""
    if not path.exists():
        return 0
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")
    torn = lines.pop()  # what follows the last newline: "" if the last write finished
    kept, dropped = [], int(bool(torn.strip()))
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            keep = isinstance(record, dict) and int(record.get("step", 0)) <= step
        except (ValueError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped or torn:
        write_file(path, "".join(line + "\n" for line in kept))
    return dropped


class MetricsLog:
    """The run's metrics.jsonl. `resume_step`: the step of the checkpoint a resumed run starts from (the
    log is cut back to it); None for a new run, whose log starts empty."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        if resume_step is None:
            write_file(path, "")
        else:
            cut_back(path, resume_step)
        self._file = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def sync(self) -> None:
        """Make everything written so far durable (before a checkpoint that covers it is committed)."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()
