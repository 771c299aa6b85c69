"""Async scheduling: schedule() one step ahead of update(), over placeholder tokens.

A fake device makes each sampled token a function of the sampled row's input token and position
(a bigram model), reading placeholder rows from the previous step's sampled tokens as the runner
does on the GPU. Running the same workload synchronously and one step ahead must give every
request the same tokens and finish reason, with EOS, max_tokens, max_model_len, preemption,
chunked prefill, prefix caching and aborts (at a given output length) mixed in.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.core.helpers import check_invariants, make_scheduler

VOCAB = 50


def fake_device(out, prev_sampled):
    """The step's sampled tokens; placeholder rows read `prev_sampled` (the previous step's)."""
    ids = out.input_ids.astype(np.int64).copy()
    rows = out.placeholder_rows
    if rows.shape[0]:
        assert (ids[rows] == 0).all()
        ids[rows] = prev_sampled[out.placeholder_src]
    last = out.logits_indices
    return (ids[last] * 7 + out.positions[last] * 3 + 1) % VOCAB


def test_placeholder_rows_point_at_the_previous_steps_samples():
    s = make_scheduler(async_scheduling=True)
    s.add_request("a", [10, 11, 12], max_tokens=3)
    s.add_request("b", [20], max_tokens=3)
    first = s.schedule()  # both prefill (b's one-token prompt counts as a decode: first)
    assert first.placeholder_rows.tolist() == []
    assert first.seq_ids.tolist() == [1, 0]
    second = s.schedule()  # both decode over the tokens step 1 is still sampling
    assert second.num_decodes == 2
    assert second.input_ids.tolist() == [0, 0]
    assert second.placeholder_rows.tolist() == [0, 1]
    assert second.seq_ids.tolist() == [0, 1]
    assert second.placeholder_src.tolist() == [1, 0]  # b was step 1's first sampled row
    assert second.positions.tolist() == [3, 1]
    assert s.num_pending_updates() == 2
    with pytest.raises(ValueError, match="two steps not updated"):
        s.schedule()
    assert s.request_info("a")["num_output_placeholders"] == 2
    s.update(np.array([6, 5]))
    assert s.request_info("a")["output_token_ids"] == [5]
    third = s.schedule()  # placeholders of step 2 only; step 1's tokens are real now
    assert third.placeholder_src.tolist() == [0, 1]
    assert third.positions.tolist() == [4, 2]
    s.update(np.array([7, 8]))
    upd = s.update(np.array([9, 9]))
    assert sorted(upd.finish_reasons) == ["length", "length"]
    assert not s.has_unfinished_requests()
    check_invariants(s)


def test_sync_scheduler_still_refuses_to_run_ahead():
    s = make_scheduler()
    s.add_request("a", [1, 2])
    s.schedule()
    with pytest.raises(ValueError, match="twice without update"):
        s.schedule()


def test_a_request_at_its_length_limit_is_not_scheduled_over_its_last_token():
    s = make_scheduler(async_scheduling=True)
    s.add_request("a", [1, 2], max_tokens=1)
    s.schedule()
    ahead = s.schedule()  # a's only token is in flight: nothing more to compute
    assert ahead.num_tokens == 0
    upd = s.update(np.array([3]))
    assert upd.finish_reasons == ["length"]
    assert s.update(np.zeros(0, dtype=np.int64)).token_ids.tolist() == []
    check_invariants(s)


def run(reqs, cfg, async_mode, eos):
    s = make_scheduler(**cfg, async_scheduling=async_mode)
    results = {}
    outputs = {}
    seq_to_id = {}
    abort_at = {}
    for i, (prompt, max_tokens, abort_after) in enumerate(reqs):
        seq = s.add_request(f"r{i}", prompt, max_tokens=max_tokens, eos_token_ids=[eos])
        seq_to_id[seq] = f"r{i}"
        outputs[f"r{i}"] = []
        if abort_after is not None:
            abort_at[f"r{i}"] = abort_after
    in_flight = []  # (out, sampled), oldest first
    prev = np.zeros(0, dtype=np.int64)
    for _ in range(2000):
        if s.has_unfinished_requests() and len(in_flight) < (2 if async_mode else 1):
            out = s.schedule()
            prev = fake_device(out, prev)
            in_flight.append(prev)
            if async_mode and len(in_flight) == 1:
                continue  # keep one step in flight before reading any
        if not in_flight:
            break
        sampled = in_flight.pop(0)
        upd = s.update(sampled)
        for seq, tok in zip(upd.seq_ids.tolist(), upd.token_ids.tolist()):
            outputs[seq_to_id[seq]].append(tok)
        for seq, reason in zip(upd.finished_seq_ids.tolist(), upd.finish_reasons):
            rid = seq_to_id[seq]
            assert rid not in results
            results[rid] = reason
        for rid, n in abort_at.items():
            if rid not in results and len(outputs[rid]) >= n:
                s.abort(rid)
                results[rid] = "abort"
        check_invariants(s)
    assert not s.has_unfinished_requests() and not in_flight
    assert s.stats()["num_free_blocks"] == cfg["num_blocks"]
    return {rid: (results[rid], outputs[rid]) for rid in outputs}


request = st.tuples(
    st.integers(1, 30),  # prompt length
    st.integers(1, 24),  # max tokens
    st.integers(0, 3),  # prompt family (shared prefixes)
    st.one_of(st.none(), st.integers(1, 10)),  # abort once it has this many tokens
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    reqs=st.lists(request, min_size=1, max_size=10),
    num_blocks=st.integers(12, 40),
    block_size=st.sampled_from([1, 4, 16]),
    budget=st.integers(4, 64),
    max_num_seqs=st.integers(1, 6),
    prefix=st.booleans(),
    eos=st.integers(0, VOCAB - 1),
)
def test_async_scheduling_gives_the_same_tokens_as_sync(
    reqs, num_blocks, block_size, budget, max_num_seqs, prefix, eos
):
    cfg = {
        "num_blocks": num_blocks,
        "block_size": block_size,
        "max_num_batched_tokens": budget,
        "max_num_seqs": max_num_seqs,
        "enable_prefix_caching": prefix,
        "max_model_len": 48,
    }
    work = []
    for plen, max_tokens, family, abort_after in reqs:
        if -(-(plen + max_tokens) // block_size) > num_blocks:
            continue  # could never fit (the scheduler rejects it; tested elsewhere)
        work.append(([family * 7 + j for j in range(plen)], max_tokens, abort_after))
    sync = run(work, cfg, False, eos)
    ahead = run(work, cfg, True, eos)
    assert ahead == sync
