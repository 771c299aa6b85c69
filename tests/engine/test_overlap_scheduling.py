"""Overlap scheduling (`async_scheduling`) against the synchronous step loop.

The engine with overlap schedules step N + 1 over placeholder tokens before it has read step N's;
every output must be the same as without it: tokens, text, finish and stop reasons, logprobs,
streamed deltas that add up to the final text (nothing after a stop leaks), with EOS, stop
strings, stop ids, max_tokens, n > 1, seeds, penalties (which run those steps synchronously)
and preemption mixed in; aborts free every block.
"""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kestrel import LLM, SamplingParams
from tests.engine.helpers import prompts_of

ARCH = "qwen2"
NUM_BLOCKS = 48
_serial = itertools.count()  # request ids unique across examples


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    def make(async_scheduling: bool) -> LLM:
        return LLM(
            tiny_model_dir(ARCH),
            block_size=4,
            num_kv_blocks=NUM_BLOCKS,  # small: long batches preempt
            max_num_batched_tokens=32,  # chunked prefill
            async_scheduling=async_scheduling,
        )

    return {"overlap": make(True), "sync": make(False)}


def run_streaming(llm: LLM, requests) -> dict:
    """Steps the engine by hand; returns request id -> (final output, text deltas per sample)."""
    engine = llm.engine
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params, stream=True)
    finals: dict = {}
    deltas: dict = {rid: {} for rid in requests}
    for _ in range(2000):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            for c in out.outputs:
                deltas[out.request_id].setdefault(c.index, []).append(c.text_delta)
            if out.finished:
                finals[out.request_id] = out
    assert not engine.has_unfinished_requests()
    stats = engine.stats()
    assert stats["num_free_blocks"] == NUM_BLOCKS and stats["kv_cache_usage"] == 0.0
    assert not engine._seqs
    return {rid: (finals[rid], deltas[rid]) for rid in requests}


def assert_same(a, b):
    out_a, deltas_a = a
    out_b, deltas_b = b
    assert out_a.error is None and out_b.error is None
    assert len(out_a.outputs) == len(out_b.outputs)
    for ca, cb in zip(out_a.outputs, out_b.outputs):
        assert ca.token_ids == cb.token_ids
        assert ca.text == cb.text
        assert (ca.finish_reason, ca.stop_reason) == (cb.finish_reason, cb.stop_reason)
        assert "".join(deltas_a[ca.index]) == ca.text  # no text after a stop leaked
        assert "".join(deltas_b[cb.index]) == cb.text
        assert (ca.logprobs is None) == (cb.logprobs is None)
        for ea, eb in zip(ca.logprobs or [], cb.logprobs or []):
            assert ea.keys() == eb.keys()
            for t in ea:
                assert math.isclose(ea[t].logprob, eb[t].logprob, rel_tol=1e-4, abs_tol=1e-5)


params_strategy = st.fixed_dictionaries(
    {
        "max_tokens": st.integers(1, 20),
        "n": st.integers(1, 3),
        "sampled": st.booleans(),  # seeded sampling instead of greedy
        "ignore_eos": st.booleans(),
        "stop": st.sampled_from([None, ["a"], ["e", "th"], [" "]]),
        "stop_token_ids": st.sampled_from([[], [7], [100, 200, 300]]),
        "penalty": st.booleans(),  # a history-reading step: runs synchronously
        "logprobs": st.sampled_from([None, 0, 2]),
    }
)


def make_params(p: dict, seed: int) -> SamplingParams:
    return SamplingParams(
        max_tokens=p["max_tokens"],
        n=p["n"],
        temperature=0.8 if p["sampled"] else 0.0,
        seed=seed if p["sampled"] else None,
        ignore_eos=p["ignore_eos"],
        stop=p["stop"],
        stop_token_ids=p["stop_token_ids"],
        repetition_penalty=1.3 if p["penalty"] else 1.0,
        logprobs=p["logprobs"],
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    params=st.lists(params_strategy, min_size=6, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_overlap_gives_the_same_outputs_as_sync(engines, lengths, params, seed):
    prompts = prompts_of(lengths, seed=seed)
    tag = next(_serial)
    requests = {
        f"r{tag}-{i}": (prompt, make_params(params[i], seed + i))
        for i, prompt in enumerate(prompts)
    }
    overlap = run_streaming(engines["overlap"], requests)
    sync = run_streaming(engines["sync"], requests)
    for rid in requests:
        assert_same(overlap[rid], sync[rid])


def test_overlap_really_runs_ahead(engines):
    """Pure decode steps are launched before the previous step's tokens are read."""
    engine = engines["overlap"].engine
    engine.add_request("x", [5, 6, 7], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    pending = []
    while engine.has_unfinished_requests():
        engine.step()
        pending.append(engine.scheduler.num_pending_updates())
    assert max(pending) == 1  # a step stayed in flight across step() calls
    assert engine.stats()["num_free_blocks"] == NUM_BLOCKS


def test_abort_with_a_step_in_flight_frees_everything(engines):
    engine = engines["overlap"].engine
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    for i, prompt in enumerate(prompts_of([9, 5, 13], seed=4)):
        engine.add_request(f"a{i}", prompt, params)
    for _ in range(4):
        engine.step()
    assert engine.scheduler.num_pending_updates() == 1
    engine.abort_request("a1")
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] = out
    assert "a1" not in outputs
    assert all(len(outputs[r].outputs[0].token_ids) == 30 for r in ("a0", "a2"))
    assert engine.stats()["num_free_blocks"] == NUM_BLOCKS
    assert not engine._seqs and not engine._history_seqs
