"""The engine core in its own process (MPAsyncEngine over core_process): the same outputs as the
in-process engine, admission over every front end, stop strings that never leak a token, and
a core that dies taking no request down silently. Each test runs its own event loop with a hard
timeout; the module shares one core process (max_num_seqs 4, max_queued_requests 2)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
from pathlib import Path

import httpx
import pytest

from kestrel.config import EngineConfig
from kestrel.engine.async_engine import AsyncLLMEngine
from kestrel.engine.core_client import MPAsyncEngine, launch_core
from kestrel.engine.request_stream import (
    EngineDeadError,
    QueueFullError,
    RequestTooLargeError,
)
from kestrel.errors import InvalidRequestError
from kestrel.sampling_params import SamplingParams
from tests.server.harness import MODEL_NAME, start_server

TIMEOUT_S = 60


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def _config(tiny_model: str) -> EngineConfig:
    return EngineConfig(model=tiny_model, max_model_len=256, max_num_seqs=4)


@pytest.fixture(scope="module")
def core(tiny_model):
    core, tokenizer = launch_core(_config(tiny_model), max_queued_requests=2, log_level="warning")
    yield core, tokenizer
    core.kill()


def run_clients(core, body, num_clients: int = 1):
    """Runs `body(*clients)` with fresh clients of the shared core, closed afterwards."""
    process, tokenizer = core

    async def main():
        clients = [
            MPAsyncEngine.connect(
                process.facts, tokenizer, process.input_address, max_queued_requests=2
            )
            for _ in range(num_clients)
        ]
        for c in clients:
            c.start()
        try:
            return await asyncio.wait_for(body(*clients), TIMEOUT_S)
        finally:
            for c in clients:
                await c.shutdown()

    return asyncio.run(main())


async def _collect(engine, request_id, prompt, params):
    return [o async for o in engine.generate(request_id, prompt, params)]


def _in_thread(tiny_model, body):
    async def main():
        engine = AsyncLLMEngine.from_config(_config(tiny_model))
        engine.start()
        try:
            return await asyncio.wait_for(body(engine), TIMEOUT_S)
        finally:
            await engine.shutdown()

    return asyncio.run(main())


CASES = {
    "greedy text prompt": ("The kestrel", greedy(12)),
    "logprobs": ([4, 5, 6, 7], greedy(6, logprobs=3)),
    "seeded n=2": ([9, 8, 7], SamplingParams(temperature=0.9, seed=11, n=2, max_tokens=8)),
    "penalties": ([3] * 12, greedy(10, repetition_penalty=1.3, frequency_penalty=0.5)),
    "prompt logprobs": ("The kestrel hovers over the field", greedy(4, prompt_logprobs=3)),
    "prompt logprobs n=2": (
        [5, 9, 2, 7, 7, 1, 30, 4],
        SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=3, prompt_logprobs=0, logprobs=1),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_equal_the_in_process_engine(core, tiny_model, case):
    prompt, params = CASES[case]

    async def body(engine):
        outs = await _collect(engine, "r", prompt, params)
        deltas = ["".join(o.outputs[i].text_delta for o in outs) for i in range(params.n)]
        ids = [[t for o in outs for t in o.outputs[i].token_ids_delta] for i in range(params.n)]
        return outs[-1], deltas, ids

    (mp, mp_deltas, mp_ids), (th, _, _) = run_clients(core, body), _in_thread(tiny_model, body)
    assert mp.finished
    for a, b, text, ids in zip(mp.outputs, th.outputs, mp_deltas, mp_ids):
        assert a.token_ids == b.token_ids and a.text == b.text
        assert (a.finish_reason, a.stop_reason) == (b.finish_reason, b.stop_reason)
        assert a.logprobs == b.logprobs
        assert text == a.text and ids == a.token_ids  # the deltas add up
    assert mp.prompt_logprobs == th.prompt_logprobs  # numbers and decoded texts
    if params.prompt_logprobs is not None:
        assert mp.prompt_logprobs[0] is None and len(mp.prompt_logprobs) == len(mp.prompt_token_ids)
        assert all(
            e[t].decoded_token for e, t in zip(mp.prompt_logprobs[1:], mp.prompt_token_ids[1:])
        )


def test_stop_string_ends_the_sample_without_leaking_tokens(core, tiny_model):
    async def body(engine):
        full = (await _collect(engine, "full", "The kestrel", greedy(12)))[-1].outputs[0]
        stop = full.text[3:6]
        outs = await _collect(engine, "stop", "The kestrel", greedy(12, stop=[stop]))
        return full, stop, outs

    full, stop, outs = run_clients(core, body)
    _, _, th_outs = _in_thread(tiny_model, body)
    final = outs[-1].outputs[0]
    assert final.finish_reason == "stop" and final.stop_reason == stop
    assert stop not in final.text and full.text.startswith(final.text)
    assert final.token_ids == th_outs[-1].outputs[0].token_ids
    assert len(final.token_ids) < len(full.token_ids)
    assert "".join(o.outputs[0].text_delta for o in outs) == final.text


def test_admission_counts_sequences_over_every_front_end(core):
    async def body(a, b):
        with pytest.raises(RequestTooLargeError, match="7 sequences"):
            await a.add_request("big", [4] * 8, greedy(5, n=7))
        first = await a.add_request("n5", [4] * 8, greedy(200, n=5))
        with pytest.raises(QueueFullError, match="5 sequences in flight"):
            await b.add_request("n2", [4] * 8, greedy(5, n=2))  # the other front end's 5 count
        first.abort()
        for _ in range(200):  # the abort reaches the core asynchronously
            try:
                outs = await _collect(b, "n2b", [4] * 8, greedy(3, n=2))
                break
            except QueueFullError:
                await asyncio.sleep(0.01)
        return outs[-1], a.num_seqs_in_flight, b.num_seqs_in_flight

    final, left_a, left_b = run_clients(core, body, num_clients=2)
    assert final.finished and [len(c.token_ids) for c in final.outputs] == [3, 3]
    assert left_a == left_b == 0


def test_bad_requests_fail_alone_with_their_param(core):
    async def body(engine):
        with pytest.raises(InvalidRequestError, match="out of range") as bad:
            await engine.add_request("bad", [10**6], greedy(2))
        with pytest.raises(ValueError, match="empty"):
            await engine.add_request("empty", [], greedy(2))
        with pytest.raises(InvalidRequestError, match="top_k") as big_k:
            await engine.add_request("k", [4], SamplingParams(top_k=10**6, max_tokens=2))
        # One bad prompt refuses its whole batch.
        with pytest.raises(ValueError, match="out of range"):
            await engine.add_requests([("ok", [4, 5], greedy(3)), ("bad2", [10**6], greedy(3))])
        engine.check_health()
        outs = await _collect(engine, "good", [4, 5, 6], greedy(2))
        return bad.value.param, big_k.value.param, outs[-1], engine.num_in_flight

    bad_param, k_param, final, in_flight = run_clients(core, body)
    assert bad_param == "prompt" and k_param == "top_k"
    assert final.finished and in_flight == 0


def test_abort_frees_kv_blocks_in_the_core(core):
    async def body(engine):
        stream = await engine.add_request("long", [5] * 40, greedy(200))
        await stream.__anext__()
        stream.abort()
        for _ in range(500):
            stats = engine.stats()
            if stats["num_running"] == 0 and stats["kv_cache_usage"] == 0:
                return stats
            await asyncio.sleep(0.01)
        return engine.stats()

    stats = run_clients(core, body)
    assert stats["num_running"] == 0 and stats["kv_cache_usage"] == 0


def test_a_killed_core_fails_every_stream_and_health(tiny_model):
    async def main():
        engine = MPAsyncEngine.launch(_config(tiny_model), log_level="warning")
        engine.start()
        try:
            stream = await engine.add_request("x", [4] * 8, greedy(240))
            await stream.__anext__()
            os.kill(engine._core.pid, signal.SIGKILL)
            with pytest.raises(EngineDeadError, match="exited"):
                async for _ in stream:
                    pass
            assert engine.is_dead
            with pytest.raises(EngineDeadError):
                engine.check_health()
            with pytest.raises(EngineDeadError):
                await engine.add_request("y", [4] * 8, greedy(5))
        finally:
            await engine.shutdown()

    asyncio.run(asyncio.wait_for(main(), TIMEOUT_S))


def test_start_up_failure_in_the_core_is_reported(tiny_model, tmp_path):
    bad = tmp_path / "model"
    shutil.copytree(tiny_model, bad)
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["NotAModelForCausalLM"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="NotAModelForCausalLM.*not supported"):
        MPAsyncEngine.launch(EngineConfig(model=str(bad)), log_level="error")


def test_two_api_servers_share_one_core(tiny_model, tmp_path):
    server = start_server(tiny_model, tmp_path / "server.log", "--api-server-count", "2")
    try:
        body = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 8, "ignore_eos": True}

        async def many():
            async with httpx.AsyncClient(timeout=60) as client:
                rs = await asyncio.gather(
                    *[client.post(server.url + "/v1/completions", json=body) for _ in range(16)]
                )
            return rs

        responses = asyncio.run(many())
        assert [r.status_code for r in responses] == [200] * 16
        # Every request ran to its length (greedy texts are not compared: batches of different
        # compositions may round differently in fp32 on the CPU and flip near-tied tokens).
        assert [r.json()["usage"]["completion_tokens"] for r in responses] == [8] * 16
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
        # Whichever API process answers /metrics, it counts the requests of both.
        for _ in range(6):
            metrics = httpx.get(server.url + "/metrics", timeout=10).text
            success = [
                float(line.rsplit(" ", 1)[1])
                for line in metrics.splitlines()
                if line.startswith("kestrel:request_success_total{")
            ]
            assert sum(success) == 16, metrics
            assert metrics.count("# TYPE kestrel:num_requests_running gauge") == 1
    finally:
        code = server.stop()
    assert code == 0, server.log()


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_killing_the_core_mid_stream_ends_the_stream_and_the_server(tiny_model, tmp_path):
    server = start_server(tiny_model, tmp_path / "server.log")
    try:
        body = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 400, "ignore_eos": True}
        events = []
        with httpx.stream(
            "POST", server.url + "/v1/completions", json=body | {"stream": True}, timeout=60
        ) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    events.append(line[6:])
                    break
            (core_pid,) = _children(server.proc.pid)
            os.kill(core_pid, signal.SIGKILL)
            killed_at = time.monotonic()
            events += [line[6:] for line in lines if line.startswith("data: ")]
        ended_after = time.monotonic() - killed_at
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert "engine" in error["message"] and error["type"] == "service_unavailable_error"
        assert ended_after < 5.0
        assert server.proc.wait(30) == 1, server.log()
    finally:
        server.stop()


def test_a_killed_core_is_replaced_with_restart_on_failure(tiny_model):
    async def main():
        engine = MPAsyncEngine.launch(
            _config(tiny_model), log_level="warning", restart_on_failure=True
        )
        engine.start()
        try:
            stream = await engine.add_request("x", [4] * 8, greedy(240))
            await stream.__anext__()
            old_pid = engine._core.pid
            os.kill(old_pid, signal.SIGKILL)
            with pytest.raises(EngineDeadError, match="exited"):
                async for _ in stream:
                    pass
            assert not engine.is_dead  # restarting, not dead: the server keeps running
            with pytest.raises(EngineDeadError, match="restarting"):
                engine.check_health()
            with pytest.raises(EngineDeadError, match="restarting"):
                await engine.add_request("y", [4] * 8, greedy(5))
            while True:
                try:
                    engine.check_health()
                    break
                except EngineDeadError:
                    await asyncio.sleep(0.1)
            assert engine.num_core_restarts == 1 and engine._core.pid != old_pid
            stream = await engine.add_request("z", [4] * 8, greedy(5))
            outputs = [out async for out in stream]
            assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 5
            stats = await engine.call_utility("stats")
            assert stats["num_running"] == 0 and stats["kv_cache_usage"] == 0
        finally:
            await engine.shutdown()
        assert not engine._core.is_alive()

    asyncio.run(asyncio.wait_for(main(), TIMEOUT_S))


def test_the_server_restarts_its_core_and_serves_again(tiny_model, tmp_path):
    server = start_server(tiny_model, tmp_path / "server.log", "--restart-core-on-failure")
    try:
        body = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 8, "ignore_eos": True}
        assert httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code == 200
        (core_pid,) = _children(server.proc.pid)
        os.kill(core_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        while httpx.get(server.url + "/health", timeout=10).status_code == 200:
            assert time.monotonic() - killed_at < 1.0, "/health still 200 a second after"
            time.sleep(0.05)
        refused = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert refused.status_code == 503 and "restarting" in refused.json()["error"]["message"]
        deadline = time.monotonic() + 60
        while httpx.get(server.url + "/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.2)
        ok = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 8
        assert _children(server.proc.pid) != [core_pid]
    finally:
        code = server.stop()
    assert code == 0, server.log()


def _core_child(pid: int) -> int:
    (core,) = [
        c
        for c in _children(pid)
        if b"kestrel.engine.core_process" in Path(f"/proc/{c}/cmdline").read_bytes()
    ]
    return core


def test_two_api_servers_restart_the_core_and_serve_again(tiny_model, tmp_path):
    """--api-server-count 2 --restart-core-on-failure: the parent starts the new core and both
    API servers reconnect to it (each answers 503 until then)."""
    server = start_server(
        tiny_model, tmp_path / "server.log", "--api-server-count", "2", "--restart-core-on-failure"
    )
    try:
        body = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 8, "ignore_eos": True}
        assert httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code == 200
        core_pid = _core_child(server.proc.pid)
        os.kill(core_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        while httpx.get(server.url + "/health", timeout=10).status_code == 200:
            assert time.monotonic() - killed_at < 2.0, "/health still 200 two seconds after"
            time.sleep(0.05)
        deadline = time.monotonic() + 90
        healthy = 0
        while healthy < 6:  # several answers in a row: both API processes reconnected
            ok = httpx.get(server.url + "/health", timeout=10).status_code == 200
            healthy = healthy + 1 if ok else 0
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.2)

        async def many():
            async with httpx.AsyncClient(timeout=60) as client:
                return await asyncio.gather(
                    *[client.post(server.url + "/v1/completions", json=body) for _ in range(12)]
                )

        responses = asyncio.run(many())
        assert [r.status_code for r in responses] == [200] * 12, [r.text for r in responses]
        assert _core_child(server.proc.pid) != core_pid
    finally:
        code = server.stop()
    assert code == 0, server.log()
