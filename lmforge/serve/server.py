"""Running the server: bind the socket first, then load the model on a thread while uvicorn already answers
(GET /health says 503 until the engine runs), and stop the engine when the server stops."""

from __future__ import annotations

import ipaddress
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.generate.engine import EngineConfig
from lmforge.serve.extra import require_serve_extra

require_serve_extra()

import uvicorn  # noqa: E402

from lmforge.serve.app import create_app  # noqa: E402
from lmforge.serve.config import API_KEY_ENV, ServeConfig  # noqa: E402
from lmforge.serve.state import Loaded  # noqa: E402

__all__ = ["bind", "create_app", "engine_loader", "serve"]


def engine_loader(
    model: str | Path, config: ServeConfig, engine_config: EngineConfig | None = None, dtype: str = "auto"
) -> Callable[[], Loaded]:
    """A function that loads `model` (a checkpoint or run directory) and starts an engine over it."""

    def load() -> Loaded:
        from lmforge.generate.engine import Engine
        from lmforge.loading import load_model_and_tokenizer

        net, tokenizer = load_model_and_tokenizer(model, dtype)
        engine = Engine(net, tokenizer, engine_config or EngineConfig())
        engine.start()
        name = config.served_model_name or Path(model).resolve().name
        return Loaded(engine, tokenizer, name, engine.max_context, net.config.vocab_size)

    return load


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (before anything slow happens, so clients can connect at once)."""
    try:
        family = socket.AF_INET6 if isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address) else socket.AF_INET
    except ValueError:  # a host name such as localhost
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise LmforgeError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host.") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def example_curl(url: str, with_key: bool) -> str:
    auth = f' -H "Authorization: Bearer ${API_KEY_ENV}"' if with_key else ""
    return (
        f"curl {url}/v1/completions -H 'Content-Type: application/json'{auth} "
        """-d '{"prompt": "Once upon a time", "max_tokens": 32}'"""
    )


def serve(
    model: str | Path,
    config: ServeConfig,
    engine_config: EngineConfig | None = None,
    dtype: str = "auto",
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
    log_level: str = "info",
) -> None:
    """Serve `model` until interrupted. Raises LmforgeError if the socket cannot be bound or the model fails
    to load (the server then stops instead of answering 503 forever)."""
    if not Path(model).is_dir():
        raise LmforgeError(f"--model {model}: no such directory; pass a checkpoint or run directory.")
    sock = bind(config.host, config.port)
    port = sock.getsockname()[1]
    t0 = time.perf_counter()
    app = create_app(config, engine_loader(model, config, engine_config, dtype))
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
    state = app.state.lmforge

    def failed(message: str) -> None:
        server.should_exit = True

    state.on_load_error = failed
    state.on_loaded = lambda: log(f"model loaded in {time.perf_counter() - t0:.1f} s; ready")
    url = url_of(config.host, port)
    log(f"serving {model} at {url} (OpenAI API under {url}/v1; /health is 503 until the model has loaded)")
    log("try: " + example_curl(url, config.api_key is not None))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if state.error is not None:
        raise LmforgeError(f"the model failed to load: {state.error}")
