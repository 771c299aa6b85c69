"""The serving benchmark's raw SSE client (benchmarks/sse_client.py) against a scripted server:
chunk boundaries inside lines, keep-alive reuse, error statuses, content-length bodies."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from sse_client import HTTPStatusError, SSEClient


def _chunk(b: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(b), b)


async def _serve(responses: list[bytes]):
    """A server answering each request on a connection with the next scripted response."""
    seen: list[bytes] = []
    connections = [0]

    async def handle(reader, writer):
        connections[0] += 1
        try:
            while responses:
                head = await reader.readuntil(b"\r\n\r\n")
                n = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                seen.append(head + await reader.readexactly(n))
                writer.write(responses.pop(0))
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, port, seen, connections


def _sse(events: list[bytes], split: int) -> bytes:
    """A chunked 200 response whose body (the events) is cut every `split` bytes."""
    body = b"".join(b"data: " + e + b"\n\n" for e in events)
    out = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    for i in range(0, len(body), split):
        out += _chunk(body[i : i + split])
    return out + b"0\r\n\r\n"


async def _lines(client: SSEClient, body: bytes = b"{}") -> list[bytes]:
    return [line async for line in client.stream_lines("/v1/completions", body, {"X-A": "1"})]


@pytest.mark.parametrize("split", [1, 3, 7, 1000])
def test_lines_across_chunk_boundaries_and_reuse(split):
    async def run():
        events = [b'{"i": %d}' % i for i in range(5)] + [b"[DONE]"]
        server, port, seen, connections = await _serve([_sse(events, split), _sse(events, split)])
        client = SSEClient(f"http://127.0.0.1:{port}", timeout=5)
        first = await _lines(client, b'{"a": 1}')
        second = await _lines(client)
        await client.close()
        server.close()
        data = [line for line in first if line]
        assert data == [b"data: " + e for e in events]
        assert second == first
        assert connections[0] == 1  # keep-alive: the second request reused the connection
        assert seen[0].startswith(b"POST /v1/completions HTTP/1.1\r\n")
        assert b"X-A: 1\r\n" in seen[0] and seen[0].endswith(b'\r\n\r\n{"a": 1}')

    asyncio.run(run())


def test_error_statuses_raise_with_the_body():
    async def run():
        err = b'{"error": {"message": "bad"}}'
        fixed = b"HTTP/1.1 400 Bad Request\r\ncontent-length: %d\r\n\r\n%s" % (len(err), err)
        chunked = b"HTTP/1.1 503 Unavailable\r\ntransfer-encoding: chunked\r\n\r\n"
        chunked += _chunk(err[:5]) + _chunk(err[5:]) + b"0\r\n\r\n"
        ok = b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\ndata: x\n"
        server, port, _, _ = await _serve([fixed, chunked, ok])
        client = SSEClient(f"http://127.0.0.1:{port}", timeout=5)
        for status in (400, 503):
            with pytest.raises(HTTPStatusError) as info:
                await _lines(client)
            assert info.value.status == status and info.value.body == err
        assert await _lines(client) == [b"data: x", b""]
        await client.close()
        server.close()

    asyncio.run(run())


def test_only_plain_http():
    with pytest.raises(ValueError, match="plain http"):
        SSEClient("https://example.com", timeout=1)
