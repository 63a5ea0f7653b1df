"""A small progress bar for long commands: done/total, rate, ETA and a few live numbers.

On a terminal it redraws one line; otherwise (logs, CI, tests) it prints a line every `every_s` seconds,
so that long work always shows that it is moving and how fast.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """with Progress(total, "train", unit="step") as bar: bar.update(1, loss=2.31)"""

    def __init__(
        self,
        total: float | None,
        desc: str,
        unit: str = "it",
        stream: TextIO | None = None,
        every_s: float = 10.0,
        enabled: bool = True,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every_s = every_s if not self.tty else 0.1
        self.enabled = enabled
        self.done = 0.0
        self.start = time.perf_counter()
        self._last = 0.0
        self.fields: dict[str, str] = {}

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def eta(self) -> float | None:
        if not self.total or self.rate <= 0:
            return None
        return (self.total - self.done) / self.rate

    def update(self, n: float = 1, **fields: object) -> None:
        self.done += n
        for k, v in fields.items():
            self.fields[k] = f"{v:.4g}" if isinstance(v, float) else str(v)
        now = time.perf_counter()
        if self.enabled and (now - self._last >= self.every_s or (self.total and self.done >= self.total)):
            self._last = now
            self._draw()

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        if self.total:
            pct = min(1.0, self.done / self.total)
            bar = "#" * int(pct * 20)
            head = f"{self.desc} [{bar:<20}] {self.done:g}/{self.total:g} {self.unit}"
        else:
            head = f"{self.desc} {self.done:g} {self.unit}"
        eta = self.eta()
        timing = f"{self.rate:.3g} {self.unit}/s, {format_duration(elapsed)} elapsed"
        if eta is not None:
            timing += f", ETA {format_duration(eta)}"
        extra = " ".join(f"{k}={v}" for k, v in self.fields.items())
        return f"{head} | {timing}" + (f" | {extra}" if extra else "")

    def _draw(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + self.line())
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw()
            if self.tty:
                self.stream.write("\n")
            self.stream.flush()
            self.enabled = False
