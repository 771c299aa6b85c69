"""A failure no request caused (here an injected device error in the engine step) ends the
engine: the running stream gets an error event and [DONE], and `kestrel serve` exits with code
1 so that a supervisor restarts it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx

from tests.server.harness import MODEL_NAME, start_server

INJECTION = Path(__file__).parent / "fault_injection"


def test_engine_death_ends_streams_with_an_error_and_exits_1(tiny_model, tmp_path):
    env = {
        "KESTREL_TEST_FAIL_AT_STEP": "20",
        "PYTHONPATH": os.pathsep.join([str(INJECTION), os.environ.get("PYTHONPATH", "")]),
    }
    server = start_server(tiny_model, tmp_path / "server.log", env=env)
    try:
        body = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 200, "ignore_eos": True}
        with httpx.stream(
            "POST", server.url + "/v1/completions", json=body | {"stream": True}, timeout=60
        ) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert "illegal memory access" in error["message"], error
        assert error["type"] == "service_unavailable_error"
        assert server.proc.wait(30) == 1, server.log()
        assert "the engine died" in server.log()
    finally:
        server.stop()
