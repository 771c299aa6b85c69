"""`--max-request-bytes`: request bodies larger than the limit get a 413 in OpenAI's shape
before the app parses them. A declared Content-Length over the limit is refused at once;
otherwise the body is read (counting) up to the limit and handed to the app in one piece, after
which the app's `receive` is the server's again (disconnect detection works as before)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kestrel_server.errors import APIError

DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes = {max_bytes} is invalid; allowed: an int >= 1")
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: int | None) -> APIError:
        got = f" ({size} bytes)" if size is not None else ""
        return APIError(
            413,
            f"the request body{got} is larger than this server accepts: {self.max_bytes} bytes "
            "(--max-request-bytes)",
            code="request_too_large",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
                if declared is not None and declared > self.max_bytes:
                    await self._too_large(declared).response()(scope, receive, send)
                    return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see it
                await self.app(scope, _replay([message], receive), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(None).response()(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], receive), send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
