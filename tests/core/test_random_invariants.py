"""Random arrivals, lengths, stops and aborts; invariants checked after every step."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.core.helpers import check_invariants, make_scheduler

request = st.tuples(
    st.integers(1, 40),  # prompt length
    st.integers(1, 20),  # max tokens
    st.integers(0, 8),  # arrival step
    st.integers(0, 3),  # prompt family (shared prefixes)
    st.one_of(st.none(), st.integers(1, 30)),  # abort at step
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    reqs=st.lists(request, min_size=1, max_size=12),
    num_blocks=st.integers(12, 40),
    block_size=st.sampled_from([1, 4, 16]),
    budget=st.integers(4, 64),
    max_num_seqs=st.integers(1, 6),
    prefix=st.booleans(),
    eos=st.integers(0, 50),
    seed=st.integers(0, 2**16),
)
def test_random_workload_keeps_invariants(
    reqs, num_blocks, block_size, budget, max_num_seqs, prefix, eos, seed
):
    rng = np.random.default_rng(seed)
    s = make_scheduler(
        num_blocks=num_blocks,
        block_size=block_size,
        max_num_batched_tokens=budget,
        max_num_seqs=max_num_seqs,
        enable_prefix_caching=prefix,
        max_model_len=128,
    )
    finished = {}  # request id -> (reason, tokens)
    tokens = {}
    seq_to_id = {}
    pending = sorted(enumerate(reqs), key=lambda x: x[1][2])
    accepted = set()
    for step in range(400):
        while pending and pending[0][1][2] <= step:
            i, (plen, max_tokens, _, family, _) = pending.pop(0)
            prompt = [family * 1000 + j for j in range(plen)]
            try:
                seq = s.add_request(f"r{i}", prompt, max_tokens=max_tokens, eos_token_ids=[eos])
            except ValueError as e:  # can never fit: must be a clean rejection
                assert "blocks" in str(e)
                continue
            seq_to_id[seq] = f"r{i}"
            tokens[f"r{i}"] = 0
            accepted.add(f"r{i}")
        for i, r in enumerate(reqs):
            rid = f"r{i}"
            if r[4] == step and rid in accepted and rid not in finished:
                s.abort(rid)
                finished[rid] = ("abort", tokens[rid])
        if not s.has_unfinished_requests() and not pending:
            break
        out = s.schedule()
        assert out.num_tokens <= budget
        assert out.num_reqs <= max_num_seqs
        sampled = rng.integers(0, 60, size=out.num_sampled)
        upd = s.update(sampled)
        for seq in upd.seq_ids.tolist():
            tokens[seq_to_id[seq]] += 1
        for seq, reason in zip(upd.finished_seq_ids.tolist(), upd.finish_reasons):
            rid = seq_to_id[seq]
            assert rid not in finished, f"{rid} finished twice"
            finished[rid] = (reason, tokens[rid])
        check_invariants(s)
    assert not s.has_unfinished_requests()
    assert set(finished) == accepted  # every request finished exactly once
    for i, r in enumerate(reqs):
        rid = f"r{i}"
        if rid in finished and finished[rid][0] == "length":
            assert finished[rid][1] == r[1]
        if rid in finished and finished[rid][0] != "abort":
            assert 1 <= finished[rid][1] <= r[1]
    assert s.stats()["num_free_blocks"] == num_blocks
