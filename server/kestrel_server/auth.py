"""API-key check (`Authorization: Bearer <key>`) on every route except the public ones
(default: /health, /version, /metrics and the API's own schema and docs), so that anything that
does work (/v1/*, /tokenize, /detokenize, routes added later) needs the key. A pure ASGI
middleware, so streaming and disconnect detection of the wrapped app are untouched."""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from kestrel_server.errors import APIError

# Routes that stay open when an API key is set (`--public-paths` replaces the list).
DEFAULT_PUBLIC_PATHS = ("/health", "/version", "/metrics", "/openapi.json", "/docs", "/redoc")


class APIKeyMiddleware:
    def __init__(
        self, app: ASGIApp, api_key: str, public_paths: Iterable[str] = DEFAULT_PUBLIC_PATHS
    ) -> None:
        if not api_key:
            raise ValueError("api_key must be a non-empty string")
        self.app = app
        self._expected = f"Bearer {api_key}".encode()
        self._public = frozenset(p.rstrip("/") or "/" for p in public_paths)

    def _is_public(self, path: str) -> bool:
        return (path.rstrip("/") or "/") in self._public

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                return hmac.compare_digest(value, self._expected)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope.get("method") == "OPTIONS"
            or self._is_public(scope.get("path", ""))
            or self._authorized(scope)
        ):
            await self.app(scope, receive, send)
            return
        has_header = any(name == b"authorization" for name, _ in scope.get("headers", ()))
        message = (
            "the API key is wrong: send 'Authorization: Bearer <key>' with the server's key"
            if has_header
            else "an API key is required: send 'Authorization: Bearer <key>'"
        )
        response = APIError(401, message, code="invalid_api_key").response()
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)
