"""The server's options, declared once (lmforge/options.py); `lmforge serve`'s flags are generated from them."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.errors import LmforgeError
from lmforge.options import option, validate

API_KEY_ENV = "LMFORGE_API_KEY"


@dataclass(frozen=True)
class ServeConfig:
    """The HTTP side; the engine's own options (batch, KV blocks, chunking, queue) are EngineConfig's."""

    host: str = option("127.0.0.1", "address to listen on (0.0.0.0 exposes the server to the network)")
    port: int = option(8000, "TCP port (0: any free one)")
    api_key: str | None = option(
        None, f"require 'Authorization: Bearer <key>' on the API (default: ${API_KEY_ENV}; /health, /metrics open)"
    )
    served_model_name: str | None = option(None, "the model's id in /v1/models (default: the directory's name)")
    max_tokens_cap: int = option(4096, "the largest max_tokens a request may ask for")
    max_n: int = option(16, "the largest n (choices per prompt) a request may ask for")
    request_timeout: float = option(600.0, "seconds a request may run before it is cancelled (504)")
    max_body_bytes: int = option(8 << 20, "the largest request body in bytes (413 above)")

    def __post_init__(self) -> None:
        validate(self)
        checks = [
            (0 <= self.port <= 65535, f"port must be in [0, 65535], got {self.port}"),
            (self.api_key != "", "api_key must not be empty; leave it out to serve without a key"),
            (self.max_tokens_cap >= 1, f"max_tokens_cap must be >= 1, got {self.max_tokens_cap}"),
            (self.max_n >= 1, f"max_n must be >= 1, got {self.max_n}"),
            (self.request_timeout > 0, f"request_timeout must be > 0 seconds, got {self.request_timeout}"),
            (self.max_body_bytes >= 1024, f"max_body_bytes must be >= 1024, got {self.max_body_bytes}"),
        ]
        for ok, message in checks:
            if not ok:
                raise LmforgeError(message + ".")
