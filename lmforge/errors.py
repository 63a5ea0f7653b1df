"""The one error class users see.

Every user-facing failure (bad path, bad config, corrupt checkpoint, bad option) raises `LmforgeError`
with a message that says what is wrong and how to fix it. The CLI prints it on one line and exits 2.
`assert` is kept for internal invariants only.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Iterable


class LmforgeError(Exception):
    """A problem with the user's input, with the remedy in the message."""


def suggest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """' Did you mean: a, b?' for close matches of `name` in `choices`, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""


_warned: set[str] = set()


def warn(message: str) -> None:
    """Print `lmforge: warning: <message>` on one line of stderr, once per distinct message and process."""
    if message in _warned:
        return
    _warned.add(message)
    print(f"lmforge: warning: {message}", file=sys.stderr, flush=True)
