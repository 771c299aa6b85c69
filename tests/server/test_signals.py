"""SIGTERM / SIGINT: in-flight requests are drained, then the process exits cleanly (code 0)."""

from __future__ import annotations

import json
import signal

import httpx
import pytest

from tests.server.harness import MODEL_NAME, start_server


def _signal_mid_stream(server, sig: int, max_tokens: int) -> list[str]:
    """Starts a streaming completion, sends `sig` after its first chunk, returns the events
    that followed (the data lines)."""
    body = {
        "model": MODEL_NAME,
        "prompt": "hello",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", server.url + "/v1/completions", json=body) as r,
    ):
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
        server.proc.send_signal(sig)
        rest = list(lines)
    return [line for line in rest if line.startswith("data: ")]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_in_flight_stream_and_exits_cleanly(tiny_model, tmp_path, sig):
    server = start_server(tiny_model, tmp_path / "server.log")
    try:
        events = _signal_mid_stream(server, sig, 120)  # the stream goes on to its end
        assert events[-1] == "data: [DONE]"
        assert '"finish_reason":"length"' in events[-2]
        assert server.proc.wait(30) == 0, server.log()
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.url + "/health", timeout=5)
    finally:
        server.stop(signal.SIGKILL)


def test_streams_outlasting_the_drain_window_end_with_an_error_event(tiny_model, tmp_path):
    """--shutdown-timeout 0: a stream still running at SIGTERM gets an error event and [DONE]
    (never a silent cut); the process exits with 0."""
    server = start_server(tiny_model, tmp_path / "server.log", "--shutdown-timeout", "0")
    try:
        events = _signal_mid_stream(server, signal.SIGTERM, 500)
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2][len("data: ") :])["error"]
        assert "shutting down" in error["message"] and "--shutdown-timeout" in error["message"]
        assert error["type"] == "service_unavailable_error"
        assert server.proc.wait(30) == 0, server.log()
    finally:
        server.stop(signal.SIGKILL)
