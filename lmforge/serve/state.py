"""What the handlers share: the config, and the engine once the loading thread has built it.

The model loads on a thread of its own after the socket is listening, so that GET /health answers 503
while it loads (a load balancer or `docker healthcheck` sees a live but unready server), then 200.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmforge.serve.config import ServeConfig
from lmforge.serve.errors import ApiError


@dataclass
class Loaded:
    """The served model: the running engine, its tokenizer and the numbers the API reports."""

    engine: Any  # lmforge.generate.engine.Engine, started
    tokenizer: Any  # lmforge.Tokenizer
    model_name: str
    max_context: int
    vocab_size: int  # the model's (embedding rows), which may exceed the tokenizer's


class ServerState:
    def __init__(self, config: ServeConfig, load: Callable[[], Loaded]) -> None:
        self.config = config
        self._load = load
        self.loaded: Loaded | None = None
        self.error: str | None = None  # why loading failed
        self.started = time.time()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.on_load_error: Callable[[str], None] | None = None
        self.on_loaded: Callable[[], None] | None = None
        self._lock = threading.Lock()  # between stop() and the loading thread publishing the engine

    def start_loading(self) -> None:
        self._thread = threading.Thread(target=self._run_load, name="lmforge-serve-load", daemon=True)
        self._thread.start()

    def _run_load(self) -> None:
        try:
            loaded = self._load()
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}" if not str(e).strip() else str(e)
            if self.on_load_error is not None:
                self.on_load_error(self.error)
            return
        with self._lock:
            if self._stopped:  # shut down while loading
                loaded.engine.close()
                return
            self.loaded = loaded
        if self.on_loaded is not None:
            self.on_loaded()

    def engine_error(self) -> str | None:
        """Why the engine thread died (a bug, out of memory), or None while it runs."""
        error = getattr(self.loaded.engine, "error", None) if self.loaded is not None else None
        return None if error is None else f"{type(error).__name__}: {error}"

    def require(self) -> Loaded:
        """The loaded model, or 503 (with Retry-After while it is still loading)."""
        if self.loaded is not None:
            died = self.engine_error()
            if died is not None:
                raise ApiError(
                    503, f"the engine has stopped after an error ({died}); restart the server.", code="engine_failed"
                )
            return self.loaded
        if self.error is not None:
            raise ApiError(503, f"the model failed to load: {self.error}", code="model_load_failed")
        raise ApiError(503, "the model is still loading; retry shortly.", code="loading", headers={"Retry-After": "1"})

    def stats(self) -> dict[str, Any] | None:
        return self.loaded.engine.stats() if self.loaded is not None else None

    def model_name(self) -> str:
        return self.loaded.model_name if self.loaded is not None else ""

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            loaded = self.loaded
        if loaded is not None:
            loaded.engine.close()  # stops the loop and takes the decode speed-up off the model
