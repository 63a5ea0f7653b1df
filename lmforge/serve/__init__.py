"""`lmforge serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

    from lmforge.serve import ServeConfig, serve
    serve("runs/a", ServeConfig(port=8000))          # blocks; GET /health is 503 until the model is loaded

Endpoints: /v1/models, /v1/completions, /v1/chat/completions (streaming as Server-Sent Events),
/tokenize, /detokenize, /tokenizer_info (what lm-eval's `local-completions` reads), /health, /metrics
(Prometheus) and / (the web chat page). The web stack (fastapi, uvicorn, pydantic, prometheus-client) is
the `serve` extra, imported only when a server is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmforge.serve.config import ServeConfig

if TYPE_CHECKING:
    from lmforge.serve.server import create_app, serve

__all__ = ["ServeConfig", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    # Lazy: importing lmforge.serve (for ServeConfig, the CLI's flags) must not need the extra.
    if name in ("create_app", "serve"):
        from lmforge.serve import server

        return getattr(server, name)
    raise AttributeError(f"module 'lmforge.serve' has no attribute {name!r}")
