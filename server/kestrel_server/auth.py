"""API-key check for `/v1/*` (`Authorization: Bearer <key>`); other routes (health, metrics,
version, tokenize) stay open. A pure ASGI middleware, so streaming and disconnect detection of
the wrapped app are untouched."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from kestrel_server.errors import APIError

PROTECTED_PREFIX = "/v1"


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        if not api_key:
            raise ValueError("api_key must be a non-empty string")
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                return hmac.compare_digest(value, self._expected)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        protected = path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/")
        if scope["type"] != "http" or not protected or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return
        if self._authorized(scope):
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
