"""The `serve` extra: the web stack is imported only when a server is built, with an error naming the extra."""

from __future__ import annotations

import importlib.util

from lmforge.errors import LmforgeError

# import name -> distribution name
SERVE_PACKAGES = {
    "fastapi": "fastapi",
    "uvicorn": "uvicorn",
    "pydantic": "pydantic",
    "prometheus_client": "prometheus-client",
}


def require_serve_extra() -> None:
    """Raise LmforgeError naming what to install when a package of the `serve` extra is missing."""
    missing = [dist for name, dist in SERVE_PACKAGES.items() if importlib.util.find_spec(name) is None]
    if missing:
        raise LmforgeError(
            f"lmforge serve needs {', '.join(missing)}: `pip install 'lmforge[serve]'` "
            f"(or `pip install {' '.join(missing)}`)."
        )
