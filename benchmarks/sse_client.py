"""A minimal HTTP/1.1 client for streaming (SSE) POSTs, over asyncio streams, for the serving
benchmark's load generator.

httpx's async streaming costs tens of microseconds per chunk: one client process tops out near
5k streamed chunks per second on this project's development VM against a server that does
nothing (a raw-asyncio fake SSE server), so at high concurrency the benchmark measured its own
client. This one reads the chunked body and splits lines itself (keep-alive connections, one
per in-flight request, reused afterwards). It speaks only what the benchmark needs: POST with a
JSON body, a status line, headers, a chunked or content-length body; no TLS, no redirects.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit


class HTTPStatusError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status = status
        self.body = body


class SSEClient:
    def __init__(self, base_url: str, timeout: float) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http":
            raise ValueError(f"the raw client speaks plain http only; got {base_url!r}")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._idle:
            return self._idle.pop()
        return await asyncio.wait_for(asyncio.open_connection(self.host, self.port), 30.0)

    async def stream_lines(
        self, path: str, body: bytes, headers: dict[str, str]
    ) -> AsyncIterator[bytes]:
        """POSTs `body` (JSON) to `path` and yields the response body's lines (without line
        ends) as they arrive; raises HTTPStatusError for a status other than 200."""
        reader, writer = await self._connection()
        reusable = False
        try:
            head = (
                f"POST {self.prefix}{path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Accept: text/event-stream\r\n"
            )
            head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            writer.write(head.encode() + b"\r\n" + body)
            raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.timeout)
            lines = raw.split(b"\r\n")
            status = int(lines[0].split(b" ", 2)[1])
            fields = {}
            for line in lines[1:]:
                if b":" in line:
                    k, v = line.split(b":", 1)
                    fields[k.strip().lower()] = v.strip().lower()
            chunked = fields.get(b"transfer-encoding") == b"chunked"
            if not chunked:
                n = int(fields.get(b"content-length", b"0"))
                data = await asyncio.wait_for(reader.readexactly(n), self.timeout)
                reusable = fields.get(b"connection") != b"close"
                if status != 200:
                    raise HTTPStatusError(status, data)
                for line in data.split(b"\n"):
                    yield line.rstrip(b"\r")
                return
            pending = b""
            error = bytearray() if status != 200 else None
            while True:
                size_line = await asyncio.wait_for(reader.readuntil(b"\r\n"), self.timeout)
                size = int(size_line.split(b";", 1)[0], 16)
                data = await asyncio.wait_for(reader.readexactly(size + 2), self.timeout)
                if size == 0:
                    break
                if error is not None:
                    error += data[:-2]
                    continue
                pending += data[:-2]
                *complete, pending = pending.split(b"\n")
                for line in complete:
                    yield line.rstrip(b"\r")
            reusable = fields.get(b"connection") != b"close"
            if error is not None:
                raise HTTPStatusError(status, bytes(error))
            if pending:
                yield pending.rstrip(b"\r")
        finally:
            if reusable:
                self._idle.append((reader, writer))
            else:
                writer.close()
