"""SIGTERM / SIGINT: in-flight requests are drained, then the process exits cleanly (code 0)."""

from __future__ import annotations

import signal

import httpx
import pytest
from server_harness import MODEL_NAME, start_server


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_in_flight_stream_and_exits_cleanly(tiny_model, tmp_path, sig):
    server = start_server(tiny_model, tmp_path / "server.log")
    try:
        body = {
            "model": MODEL_NAME,
            "prompt": "hello",
            "max_tokens": 120,
            "ignore_eos": True,
            "stream": True,
        }
        with (
            httpx.Client(timeout=30) as http,
            http.stream("POST", server.url + "/v1/completions", json=body) as r,
        ):
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: {"))
            assert first
            server.proc.send_signal(sig)
            rest = list(lines)  # the stream goes on to its end
        events = [line for line in rest if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert '"finish_reason":"length"' in events[-2]
        assert server.proc.wait(30) == 0, server.log()
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.url + "/health", timeout=5)
    finally:
        server.stop(signal.SIGKILL)
