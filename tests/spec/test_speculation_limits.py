"""Speculation never a slowdown: skipped for a step when the engine holds more sequences than
disable_by_batch_size, and for a sequence whose drafts were rejected lately (below
min_acceptance_rate), which is probed again after PROBE_INTERVAL steps, then after twice as
many each time a probe fails, up to MAX_PROBE_INTERVAL."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from kestrel.spec.config import SpeculativeConfig, SpeculativeConfigError
from kestrel.spec.speculator import PROBE_INTERVAL, Speculator

REPEATING = list(range(10, 20)) * 3  # the n-gram proposer always finds a continuation


class FakeScheduler:
    def __init__(self) -> None:
        self.drafted: list[int] = []

    def set_draft_tokens(self, seq_id, tokens) -> int:
        self.drafted.append(seq_id)
        return len(tokens)


def speculator(**keys) -> Speculator:
    return Speculator(
        SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 3, **keys})
    )


def candidates(*seq_ids):
    return [(s, REPEATING[:-5], REPEATING[-5:]) for s in seq_ids]


def test_defaults_and_refusals():
    c = SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 2})
    assert c.disable_by_batch_size == 32 and c.min_acceptance_rate == 0.1
    off = SpeculativeConfig.parse(
        {"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": None}
    )
    assert off.disable_by_batch_size is None
    for key, bad in (("disable_by_batch_size", 0), ("min_acceptance_rate", 1.5)):
        with pytest.raises(SpeculativeConfigError, match=key):
            SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 2, key: bad})


def test_a_large_batch_is_not_speculated():
    spec, sched = speculator(disable_by_batch_size=4), FakeScheduler()
    spec.propose(sched, candidates(1, 2), num_seqs=5)
    assert sched.drafted == [] and spec.num_skipped_steps == 1
    spec.propose(sched, candidates(1, 2), num_seqs=4)
    assert sched.drafted == [1, 2]
    assert spec.as_stats()["spec_decode_num_skipped_steps"] == 1


def _step_out(seq_ids, drafts):
    """A SchedulerOutput-like step: one sampled request per seq, drafts[j] + 1 rows each."""
    rows = np.asarray([d + 1 for d in drafts])
    loc = np.concatenate(([0], np.cumsum(rows))).astype(np.int32)
    return SimpleNamespace(
        seq_ids=np.asarray(seq_ids, dtype=np.int64),
        sampled_request_indices=np.repeat(np.arange(len(seq_ids)), rows).astype(np.int32),
        sampled_query_start_loc=loc,
        num_draft_tokens=np.asarray(drafts, dtype=np.int32),
    )


def test_a_sequence_whose_drafts_fail_stops_drafting_until_probed():
    spec, sched = speculator(min_acceptance_rate=0.3), FakeScheduler()
    spec.propose(sched, candidates(7, 8))
    assert sched.drafted == [7, 8]
    # Seq 7 accepted none of its 3 drafts, seq 8 all of them.
    spec.record_rates(_step_out([7, 8], [3, 3]), np.asarray([1, 4]))
    assert spec.rates == {7: 0.0, 8: 1.0}
    drafted_7 = []
    for _ in range(2 * PROBE_INTERVAL):
        sched.drafted.clear()
        spec.propose(sched, candidates(7, 8))
        assert 8 in sched.drafted
        drafted_7.append(7 in sched.drafted)
    assert 0 < sum(drafted_7) <= 2  # only the probes
    spec.propose(FakeScheduler(), candidates(8))
    assert 7 not in spec.rates  # a finished sequence is forgotten


def test_zero_min_acceptance_rate_always_drafts():
    spec, sched = speculator(min_acceptance_rate=0), FakeScheduler()
    spec.propose(sched, candidates(3))
    spec.record_rates(_step_out([3], [3]), np.asarray([1]))
    sched.drafted.clear()
    spec.propose(sched, candidates(3))
    assert sched.drafted == [3]


def test_failed_probes_back_off_and_a_recovery_resets():
    """Probes of a sequence that stays below the floor wait 16, 32, 64, ... up to
    MAX_PROBE_INTERVAL steps; once a probe lifts it above the floor it drafts every step."""
    from kestrel.spec.speculator import MAX_PROBE_INTERVAL

    spec, sched = speculator(min_acceptance_rate=0.3), FakeScheduler()
    spec.propose(sched, candidates(7))
    spec.record_rates(_step_out([7], [3]), np.asarray([1]))  # rejected: below the floor
    probe_steps = []
    for step in range(1, 2200):
        sched.drafted.clear()
        spec.propose(sched, candidates(7))
        if 7 in sched.drafted:
            probe_steps.append(step)
            spec.record_rates(_step_out([7], [3]), np.asarray([1]))  # the probe fails too
    gaps = np.diff([1, *probe_steps]).tolist()  # from the first step that skipped it
    assert gaps[:6] == [16, 32, 64, 128, 256, 512]
    assert set(gaps[6:]) == {MAX_PROBE_INTERVAL}
    # A probe that accepts every draft lifts the rate above the floor: drafting every step.
    while True:
        sched.drafted.clear()
        spec.propose(sched, candidates(7))
        if 7 in sched.drafted:
            break
    spec.record_rates(_step_out([7], [3]), np.asarray([4]))
    spec.record_rates(_step_out([7], [3]), np.asarray([4]))
    assert spec.rates[7] >= 0.3
    for _ in range(3):
        sched.drafted.clear()
        spec.propose(sched, candidates(7))
        assert sched.drafted == [7]


def test_may_draft_and_skipped_steps_keep_the_probe_clock():
    """Steps launched ahead without `propose` (overlap scheduling) still move the probe clock:
    a sequence below the floor becomes due after PROBE_INTERVAL steps either way."""
    spec, sched = speculator(min_acceptance_rate=0.3, disable_by_batch_size=4), FakeScheduler()
    assert spec.may_draft([7], 1)  # nothing known of it: it may draft
    spec.propose(sched, candidates(7))
    spec.record_rates(_step_out([7], [3]), np.asarray([1]))  # rejected
    spec.propose(sched, candidates(7))  # the first skipped step: its probe is 16 steps away
    due = spec._probes[7][0]
    assert not spec.may_draft([7], 1) and not spec.may_draft([7, 8], 5)
    while not spec.may_draft([7], 1):
        spec.skip(1)
    assert spec._step + 1 == due
    assert spec.may_draft([7, 8], 2)  # 8 is unknown
    spec.skip(5)  # more sequences than disable_by_batch_size: counted as skipped
    assert spec.num_skipped_steps == 1
