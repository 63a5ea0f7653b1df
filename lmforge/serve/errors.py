"""HTTP errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, which openai-python turns
into its APIError subclasses. 400: unknown fields, a request the server cannot honour (context, caps);
401: missing or wrong key; 413: body too large; 422: a value out of range; 429: the queue is full (with
Retry-After); 503: still loading; 504: the request ran past --request-timeout."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    504: "timeout_error",
}


class ApiError(Exception):
    """An error answered to the client with `status` and an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {
        "error": {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param, "code": code}
    }


def error_response(error: ApiError) -> JSONResponse:
    body = error_body(error.status, error.message, error.param, error.code)
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def _location(loc: tuple[Any, ...]) -> str:
    # ("body", "messages", 0, "role") -> "messages[0].role"; union branches ("str", "list[int]") are dropped
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in str(part) or str(part) in ("str", "int", "float", "bool", "function-after"):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def validation_error(exc: RequestValidationError) -> ApiError:
    """400 for unknown fields and unreadable JSON, 422 for known fields with bad values."""
    errors = list(exc.errors())
    unknown = [e for e in errors if e.get("type") == "extra_forbidden"]
    if unknown:
        names = sorted({_location(tuple(e["loc"])) for e in unknown})
        return ApiError(
            400,
            f"unknown field(s) {', '.join(names)}; see /docs for the accepted fields.",
            param=names[0],
            code="unknown_field",
        )
    if any(e.get("type") == "json_invalid" for e in errors):
        return ApiError(400, "the request body is not valid JSON.", code="invalid_json")
    if any(e.get("type") in ("model_attributes_type", "dict_type") and len(e.get("loc", ())) <= 1 for e in errors):
        return ApiError(400, "the request body must be a JSON object.", code="invalid_json")
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    where = _location(tuple(first.get("loc", ())))
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return ApiError(
        422,
        f"{where}: {first.get('msg')}{more}" if where else f"{first.get('msg')}{more}",
        param=where or None,
        code="invalid_value",
    )


def install_handlers(app: Any, count: Callable[[int], None]) -> None:
    """Every error the app can answer, in the one shape; `count(status)` sees each (for /metrics)."""

    def answer(error: ApiError) -> JSONResponse:
        count(error.status)
        return error_response(error)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return answer(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return answer(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status_code)
        return answer(ApiError(exc.status_code, str(exc.detail), code=code, headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        import traceback

        traceback.print_exception(exc)  # the server's log keeps the details; the client gets one line
        return answer(ApiError(500, f"internal error: {type(exc).__name__}: {exc}"))
