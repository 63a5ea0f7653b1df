"""The FastAPI app: routes, the API-key check and the body-size cap (plain ASGI middleware, so that neither
touches a streamed response), and the loading thread started with the app.

Handlers never wait on the engine thread: /health and /v1/models read flags, submissions and /metrics'
engine.stats() run on worker threads, and events come back through asyncio (see streams.py).
"""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmforge.serve.chat import create_chat_completion
from lmforge.serve.completions import create_completion
from lmforge.serve.config import ServeConfig
from lmforge.serve.errors import ApiError, error_body, install_handlers
from lmforge.serve.metrics import CONTENT_TYPE, ServerMetrics
from lmforge.serve.schemas import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from lmforge.serve.state import Loaded, ServerState
from lmforge.serve.tokens import detokenize, tokenize, tokenizer_info

STATIC = Path(__file__).parent / "static"
PROTECTED = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")  # /health, /metrics, / and /docs stay open


async def _send_error(send: Send, status: int, message: str, code: str, headers: dict[str, str] | None = None) -> None:
    from lmforge.serve.choices import dumps

    body = dumps(error_body(status, message, code=code)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class ApiKeyMiddleware:
    """401 unless `Authorization: Bearer <key>` (compared in constant time) on the API's paths."""

    def __init__(self, app: ASGIApp, api_key: str, count: Callable[[int], None]) -> None:
        self.app = app
        self.key = api_key.encode()
        self.count = count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED) and scope["method"] != "OPTIONS":
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, given = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
                what = "no API key given" if not header else "the API key is wrong"
                self.count(401)
                await _send_error(
                    send,
                    401,
                    f"{what}; send 'Authorization: Bearer <key>'.",
                    "invalid_api_key",
                    {"WWW-Authenticate": "Bearer"},
                )
                return
        await self.app(scope, receive, send)


class _TooLarge(StarletteHTTPException):
    # An HTTPException: FastAPI passes those through from body reading (any other error becomes its 400).
    def __init__(self, message: str) -> None:
        super().__init__(413, message)


class BodyLimitMiddleware:
    """413 for a body above `limit` bytes: by Content-Length up front, or counted as a chunked body arrives."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"the request body is larger than this server's limit of {self.limit} bytes (--max-body-bytes)."
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await _send_error(send, 413, message, "payload_too_large")
            return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge(message)
            return msg

        async def tracking_send(msg: Message) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:  # raised where no handler turned it into the 413 response
            if not started:
                await _send_error(send, 413, message, "payload_too_large")


def create_app(config: ServeConfig, load: Callable[[], Loaded]) -> FastAPI:
    """The server's ASGI app. `load` builds the engine (on a thread of its own, started with the app)."""
    state = ServerState(config, load)
    metrics = ServerMetrics(state.stats, state.model_name)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start_loading()
        try:
            yield
        finally:
            state.stop()

    app = FastAPI(title="lmforge", summary="OpenAI-compatible API over lmforge's engine", lifespan=lifespan)
    app.state.lmforge = state
    app.state.metrics = metrics

    def count_rejected(status: int) -> None:
        metrics.rejected.labels(str(status)).inc()

    install_handlers(app, count_rejected)

    def check_model(name: str | None) -> Loaded:
        loaded = state.require()
        if name is not None and name != loaded.model_name:
            raise ApiError(
                404,
                f"the model {name!r} does not exist; this server serves {loaded.model_name!r}.",
                param="model",
                code="model_not_found",
            )
        return loaded

    @app.get("/health")
    async def health() -> Response:
        died = state.engine_error()
        if state.loaded is not None and died is None:
            return JSONResponse({"status": "ok"})
        status = "loading" if state.loaded is None and state.error is None else "failed"
        error = state.error or died
        return JSONResponse({"status": status, "error": error}, status_code=503, headers={"Retry-After": "1"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(await run_in_threadpool(metrics.render), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        loaded = state.require()
        card = {
            "id": loaded.model_name,
            "object": "model",
            "created": int(state.started),
            "owned_by": "lmforge",
            "max_model_len": loaded.max_context,
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        check_model(req.model)
        return await create_completion(request, req, state, metrics)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        check_model(req.model)
        return await create_chat_completion(request, req, state, metrics)

    @app.post("/tokenize")
    async def tokenize_route(req: TokenizeRequest) -> dict[str, Any]:
        return await run_in_threadpool(tokenize, req, check_model(req.model))

    @app.post("/detokenize")
    async def detokenize_route(req: DetokenizeRequest) -> dict[str, Any]:
        return await run_in_threadpool(detokenize, req, check_model(req.model))

    @app.get("/tokenizer_info")
    async def tokenizer_info_route() -> dict[str, Any]:
        return tokenizer_info(state.require())

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        page = STATIC / "index.html"
        if page.is_file():
            return FileResponse(page, media_type="text/html")
        return JSONResponse({"message": "lmforge serve: the OpenAI-compatible API is under /v1", "docs": "/docs"})

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    app.add_middleware(BodyLimitMiddleware, limit=config.max_body_bytes)
    if config.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=config.api_key, count=count_rejected)  # added last: runs first
    return app
