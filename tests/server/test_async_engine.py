"""AsyncLLMEngine without HTTP: streaming, abort, queue limit, bad requests, engine failure and
shutdown. Each test runs its own event loop with a hard timeout."""

from __future__ import annotations

import asyncio

import pytest

from kestrel.config import EngineConfig
from kestrel.engine.async_engine import (
    AsyncLLMEngine,
    EngineDeadError,
    QueueFullError,
    RequestAbortedError,
    RequestFailedError,
    RequestTooLargeError,
)
from kestrel.sampling_params import SamplingParams

TIMEOUT_S = 60


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def run(tiny_model: str, body, **engine_kwargs):
    """Runs `body(engine)` on a started engine and shuts it down afterwards."""

    async def main():
        engine = AsyncLLMEngine.from_config(
            EngineConfig(model=tiny_model, max_model_len=256, max_num_seqs=4),
            **engine_kwargs,
        )
        engine.start()
        try:
            return await asyncio.wait_for(body(engine), TIMEOUT_S)
        finally:
            await engine.shutdown()

    return asyncio.run(main())


def test_stream_deltas_add_up_and_match_offline(tiny_model, offline):
    async def body(engine):
        deltas, ids, outputs = "", [], []
        async for out in engine.generate("a", "The kestrel", greedy(10)):
            deltas += out.outputs[0].text_delta
            ids += out.outputs[0].token_ids_delta
            outputs.append(out)
        return deltas, ids, outputs

    deltas, ids, outputs = run(tiny_model, body)
    final = outputs[-1]
    assert final.finished and all(not o.finished for o in outputs[:-1])
    assert deltas == final.outputs[0].text and ids == final.outputs[0].token_ids
    reference = offline.generate("The kestrel", greedy(10), use_tqdm=False)[0].outputs[0]
    assert final.outputs[0].token_ids == reference.token_ids


def test_abort_frees_kv_blocks_at_the_next_step(tiny_model):
    async def body(engine):
        stream = await engine.add_request("long", [5] * 40, greedy(200))
        first = await stream.__anext__()
        assert not first.finished
        for _ in range(100):  # the stats snapshot follows the engine loop
            if engine.stats()["kv_cache_usage"] > 0:
                break
            await asyncio.sleep(0.01)
        busy = engine.stats()
        stream.abort()
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
        for _ in range(500):
            stats = engine.stats()
            if stats["num_running"] == 0 and stats["kv_cache_usage"] == 0:
                break
            await asyncio.sleep(0.01)
        return busy, engine.stats(), engine.num_in_flight

    busy, idle, in_flight = run(tiny_model, body)
    assert busy["kv_cache_usage"] > 0 and busy["num_running"] == 1
    assert idle["kv_cache_usage"] == 0 and idle["num_running"] == 0
    assert in_flight == 0


def test_closing_the_generator_aborts(tiny_model):
    async def body(engine):
        gen = engine.generate("g", [7] * 10, greedy(200))
        await gen.__anext__()
        await gen.aclose()
        assert engine.num_in_flight == 0
        # The id is free again once the abort went through, and the engine still serves.
        for _ in range(500):
            if engine.stats()["num_running"] == 0:
                break
            await asyncio.sleep(0.01)
        outs = [o async for o in engine.generate("g", [7] * 10, greedy(3))]
        return outs[-1]

    final = run(tiny_model, body)
    assert final.finished and len(final.outputs[0].token_ids) == 3


def test_aborted_stream_raises_for_a_waiting_reader(tiny_model):
    async def body(engine):
        stream = await engine.add_request("w", [3] * 10, greedy(200))

        async def read_all():
            return [o async for o in stream]

        reader = asyncio.create_task(read_all())
        await asyncio.sleep(0)
        stream.abort()
        try:
            await reader
        except RequestAbortedError:
            return "aborted"
        return "completed"

    # 200 tokens cannot be done within one loop turn: the reader is parked and must not hang.
    assert run(tiny_model, body) == "aborted"


def test_queue_limit(tiny_model):
    async def body(engine):
        streams = [await engine.add_request(f"r{i}", [4] * 8, greedy(200)) for i in range(6)]
        with pytest.raises(QueueFullError, match="max_num_seqs=4.*max_queued_requests=2"):
            await engine.add_request("overflow", [4] * 8, greedy(5))
        streams[0].abort()
        accepted = await engine.add_request("after-abort", [4] * 8, greedy(2))
        for s in streams[1:]:
            s.abort()
        return [o async for o in accepted][-1]

    final = run(tiny_model, body, max_queued_requests=2)
    assert final.finished and len(final.outputs[0].token_ids) == 2


def test_bad_request_fails_alone(tiny_model):
    async def body(engine):
        with pytest.raises(ValueError, match="out of range"):
            await engine.add_request("bad", [10**6], greedy(2))
        with pytest.raises(ValueError, match="empty"):
            await engine.add_request("empty", [], greedy(2))
        engine.check_health()
        outs = [o async for o in engine.generate("good", [4, 5, 6], greedy(2))]
        return outs[-1], engine.num_in_flight

    final, in_flight = run(tiny_model, body)
    assert final.finished and in_flight == 0


def test_engine_failure_fails_requests_and_health(tiny_model):
    async def body(engine):
        def broken_step():
            raise RuntimeError("simulated device failure")

        stream = await engine.add_request("x", [4] * 8, greedy(50))
        engine._engine.step = broken_step  # the engine thread calls it on its next turn
        with pytest.raises(EngineDeadError, match="simulated device failure"):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            engine.check_health()
        with pytest.raises(EngineDeadError):
            await engine.add_request("y", [4] * 8, greedy(5))
        return True

    assert run(tiny_model, body)


def test_shutdown_aborts_in_flight_requests(tiny_model):
    async def main():
        engine = AsyncLLMEngine.from_config(EngineConfig(model=tiny_model, max_model_len=256))
        engine.start()
        stream = await engine.add_request("s", [4] * 8, greedy(240))
        await stream.__anext__()
        await asyncio.wait_for(engine.shutdown(), TIMEOUT_S)
        with pytest.raises(EngineDeadError, match="shutting down"):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await engine.add_request("t", [4] * 8, greedy(5))
        return engine._thread.is_alive()

    assert asyncio.run(main()) is False


def test_shutdown_drains_when_asked(tiny_model):
    async def main():
        engine = AsyncLLMEngine.from_config(EngineConfig(model=tiny_model, max_model_len=256))
        engine.start()
        stream = await engine.add_request("d", [4] * 8, greedy(20))
        await asyncio.wait_for(engine.shutdown(drain_timeout_s=TIMEOUT_S), TIMEOUT_S + 5)
        outs = [o async for o in stream]
        return outs[-1]

    final = asyncio.run(main())
    assert final.finished and len(final.outputs[0].token_ids) == 20


def test_n_counts_sequences_against_admission(tiny_model):
    async def body(engine):
        # max_num_seqs=4 + max_queued_requests=2: 6 sequences at most.
        with pytest.raises(RequestTooLargeError, match="7 sequences"):
            await engine.add_request("big", [4] * 8, greedy(5).clone(n=7))
        first = await engine.add_request("n5", [4] * 8, greedy(200).clone(n=5))
        assert engine.num_seqs_in_flight == 5 and engine.num_in_flight == 1
        with pytest.raises(QueueFullError, match="5 sequences in flight"):
            await engine.add_request("n2", [4] * 8, greedy(5).clone(n=2))
        first.abort()
        assert engine.num_seqs_in_flight == 0
        final = [o async for o in await engine.add_request("n2b", [4] * 8, greedy(3).clone(n=2))]
        return final[-1], engine.num_seqs_in_flight

    final, left = run(tiny_model, body, max_queued_requests=2)
    assert final.finished and [len(c.token_ids) for c in final.outputs] == [3, 3] and left == 0


def test_batch_is_admitted_together_or_not_at_all(tiny_model):
    async def body(engine):
        steps = []
        step = engine._engine.step

        def counting_step():
            outputs = step()
            steps.append(engine._engine.num_unfinished_requests())
            return outputs

        engine._engine.step = counting_step
        batch = [(f"b{i}", [4, 5, i + 6], greedy(3)) for i in range(20)]
        streams = await engine.add_requests(batch)
        finals = []
        for stream in streams:
            finals.append([o async for o in stream][-1])
        # One bad prompt refuses the whole batch and leaves nothing behind.
        bad = [("ok", [4, 5], greedy(3)), ("bad", [10**6], greedy(3))]
        with pytest.raises(ValueError, match="out of range"):
            await engine.add_requests(bad)
        return steps[0], finals, engine.num_in_flight, engine.num_seqs_in_flight

    first_step_requests, finals, in_flight, seqs = run(tiny_model, body)
    assert first_step_requests == 20  # all twenty were in the engine at the first step
    assert all(f.finished and len(f.outputs[0].token_ids) == 3 for f in finals)
    assert in_flight == 0 and seqs == 0


def test_request_failed_in_a_step_fails_only_its_stream(tiny_model, monkeypatch):
    from kestrel.sample import Sampler

    call = Sampler.__call__

    def faulty(self, logits, batch):
        if batch.max_num_logprobs == 3:  # only the faulty request asks for 3 logprobs
            raise ValueError("injected sampling fault")
        return call(self, logits, batch)

    monkeypatch.setattr(Sampler, "__call__", faulty)

    async def body(engine):
        good = await engine.add_request("good", [4] * 8, greedy(30))
        bad = await engine.add_request("bad", [5] * 8, greedy(30).clone(logprobs=3))
        with pytest.raises(RequestFailedError, match="injected sampling fault"):
            async for _ in bad:
                pass
        outs = [o async for o in good]
        engine.check_health()
        return outs[-1], engine.num_in_flight

    final, in_flight = run(tiny_model, body)
    assert final.finished and len(final.outputs[0].token_ids) == 30 and in_flight == 0
