"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Every failure a client can cause maps to a 4xx here (validation -> 400, not FastAPI's 422);
only a bug in the server itself is a 500, and it still has this shape.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kestrel.engine.async_engine import (
    EngineDeadError,
    QueueFullError,
    RequestFailedError,
    RequestTooLargeError,
)
from kestrel.errors import InvalidRequestError

logger = logging.getLogger(__name__)

# HTTP status -> OpenAI error type.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    503: "service_unavailable_error",
}
# Seconds a client is told to wait after a 503 (queue full, shutting down, engine restarting).
RETRY_AFTER_S = 1


class ErrorJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped, so that any text (even a lone surrogate echoed back in a
    message) renders; Starlette's JSONResponse would raise on it."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


class APIError(Exception):
    """An error to return to the client as it is."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "error")
        self.headers = dict(headers or {})
        if status == 503:
            self.headers.setdefault("Retry-After", str(RETRY_AFTER_S))

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return ErrorJSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def sse(self) -> str:
        """The error as a server-sent event (once a stream has started, the status is 200)."""
        return f"data: {json.dumps(self.body(), ensure_ascii=True)}\n\n"


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_exception(exc: BaseException) -> APIError:
    """Maps an engine or validation exception to the error the client sees."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return APIError(503, str(exc), code="queue_full")
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), code="engine_unavailable")
    if isinstance(exc, RequestTooLargeError):
        return bad_request(str(exc), param=exc.param, code="request_too_large")
    if isinstance(exc, InvalidRequestError):
        return bad_request(str(exc), param=exc.param)
    if isinstance(exc, RequestFailedError):
        # The engine attributed the failure to this request's parameters; the others went on.
        return bad_request(f"the request failed: {exc}", code="request_failed")
    if isinstance(exc, (ValueError, TypeError)):
        return bad_request(str(exc))
    logger.error("internal error", exc_info=exc)
    return APIError(500, f"internal server error: {type(exc).__name__}", code="internal_error")


# Characters of a bad value echoed in a validation message.
_MAX_SHOWN = 200
# Pydantic puts the member type of a union into `loc` ("stop", "str"); such tags are not fields.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def _is_type_tag(part: object) -> bool:
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None

    # A value that fails every member of a union (`prompt: str | list[str] | ...`) yields one
    # error per member; the useful one is the member whose type matched, so type mismatches
    # come last; among the others the most precise location first, among type mismatches the
    # least precise (the value as a whole has the wrong type).
    def rank(error: Any) -> tuple[bool, int]:
        is_type = str(error.get("type", "")).endswith("_type")
        depth = len(error.get("loc", ()))
        return is_type, depth if is_type else -depth

    first = min(errors, key=rank)
    loc = [str(part) for part in first.get("loc", ()) if part != "body" and not _is_type_tag(part)]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('msg')}", None
    param = ".".join(loc) or None
    where = f"'{param}'" if param else "the request body"
    value = repr(first.get("input"))
    if len(value) > _MAX_SHOWN:
        value = value[:_MAX_SHOWN] + "..."
    shown = "" if param is None else f" (got {value})"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg')}{shown}{more}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return bad_request(message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else _phrase(exc.status_code)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        return APIError(exc.status_code, message).response()

    @app.exception_handler(ValueError)
    async def _value_error(request: Request, exc: ValueError) -> JSONResponse:
        return from_exception(exc).response()

    @app.exception_handler(Exception)
    async def _other_error(request: Request, exc: Exception) -> JSONResponse:
        # Engine errors (queue full, engine dead, a request failed alone) keep their status;
        # anything else is a bug of the server: logged, and a 500 in OpenAI's shape.
        error = from_exception(exc)
        if error.status >= 500 and error.status != 503:
            logger.error("on %s %s", request.method, request.url.path)
        return error.response()


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "error"
