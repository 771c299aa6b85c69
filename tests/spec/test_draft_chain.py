"""plan_chain: the draft chain's rows, positions and slots (kestrel/spec/draft_chain.py).

Every slot a chain step writes must be one of its own request's: inside its allocated blocks at
a position not computed yet (>= T - 1), or in its own scratch blocks past the shared pool."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kestrel.spec.draft_chain import plan_chain, scratch_blocks_per_seq

BS = 4
POOL = 100  # shared blocks 0..99; scratch from 100


def test_a_small_chain_by_hand():
    # Request 0: 6 tokens (5 computed), blocks [7, 3] (8 slots); request 1: 9 tokens, [1, 2, 5].
    steps = plan_chain([6, 9], [3, 1], [[7, 3], [1, 2, 5]], block_size=BS, scratch_base=POOL,
                       scratch_per_seq=1)  # fmt: skip
    assert len(steps) == 3
    s0 = steps[0].step
    assert steps[0].rows.tolist() == [0, 1] and steps[0].keep.tolist() == [0, 1]
    assert s0.positions.tolist() == [5, 8] and s0.seq_lens.tolist() == [6, 9]
    assert s0.slot_mapping.tolist() == [3 * BS + 1, 5 * BS + 0]
    # Steps 1 and 2: request 0 alone, positions 6 and 7 (still in block 3).
    assert [c.rows.tolist() for c in steps[1:]] == [[0], [0]]
    assert steps[1].keep.tolist() == [0] and steps[2].keep.tolist() == [0]
    assert steps[2].step.slot_mapping.tolist() == [3 * BS + 3]
    assert steps[2].step.block_tables.tolist() == [[7, 3]]
    assert all(c.step.num_decodes == c.step.num_reqs == c.rows.shape[0] for c in steps)


def test_positions_past_the_allocated_blocks_go_to_scratch():
    # 9 tokens, 8 computed and blocks for exactly 8: the newest token's slot is not allocated.
    steps = plan_chain([9, 3], [4, 4], [[4, 6], [8]], block_size=BS, scratch_base=POOL,
                       scratch_per_seq=2)  # fmt: skip
    slots = [c.step.slot_mapping.tolist() for c in steps]
    # Request 0: positions 8..11 in its first scratch block (100); request 1: positions 2, 3 in
    # block 8, then 4, 5 in its first scratch block (102).
    assert [s[0] for s in slots] == [100 * BS + i for i in range(4)]
    assert [s[1] for s in slots] == [8 * BS + 2, 8 * BS + 3, 102 * BS, 102 * BS + 1]
    # Each row's table: its blocks, then its scratch ones (as wide as the longest row needs).
    assert steps[0].step.block_tables.tolist() == [[4, 6, 100], [8, 102, 103]]


def test_bad_plans_are_refused():
    with pytest.raises(ValueError, match="its first 8 must be computed"):
        plan_chain([9], [1], [[4]], block_size=BS, scratch_base=POOL, scratch_per_seq=1)
    with pytest.raises(ValueError, match="more than 1 scratch blocks"):
        plan_chain([8], [6], [[4, 6]], block_size=BS, scratch_base=POOL, scratch_per_seq=1)
    with pytest.raises(ValueError, match=">= 1 step"):
        plan_chain([8], [0], [[4, 6]], block_size=BS, scratch_base=POOL, scratch_per_seq=1)
    assert plan_chain([], [], [], block_size=BS, scratch_base=POOL, scratch_per_seq=1) == []


@settings(max_examples=200, deadline=None)
@given(data=st.data(), num_reqs=st.integers(1, 6), k=st.integers(1, 9))
def test_every_write_is_the_requests_own(data, num_reqs, k):
    scratch = scratch_blocks_per_seq(k, BS)
    free = list(range(POOL))
    data.draw(st.randoms()).shuffle(free)
    lens, steps, tables, starts = [], [], [], []
    for _ in range(num_reqs):
        t = data.draw(st.integers(1, 40))
        extra = data.draw(st.integers(0, 2))  # lookahead blocks a verify step left
        n_blocks = -(-(t - 1) // BS) + (extra if t > 1 else 0)
        tables.append([free.pop() for _ in range(n_blocks)])
        lens.append(t)
        steps.append(data.draw(st.integers(1, k)))
        starts.append(data.draw(st.sampled_from([t - 1, data.draw(st.integers(0, t - 1))])))
    plan = plan_chain(lens, steps, tables, block_size=BS, scratch_base=POOL,
                      scratch_per_seq=scratch, starts=starts)  # fmt: skip
    assert len(plan) == max(steps)
    assert sorted(plan[0].rows.tolist()) == list(range(num_reqs))
    prev = None
    for j, c in enumerate(plan):
        s = c.step
        if j:
            assert sorted(c.rows.tolist()) == [b for b in range(num_reqs) if steps[b] > j]
            assert prev[c.keep].tolist() == c.rows.tolist()
        prev = c.rows
        qsl = s.query_start_loc.tolist()
        assert s.logits_indices.tolist() == [q - 1 for q in qsl[1:]]
        assert all(qsl[i + 1] - qsl[i] == 1 for i in range(s.num_decodes))  # decodes first
        assert all(qsl[i + 1] - qsl[i] > 1 for i in range(s.num_decodes, s.num_reqs))
        for i, b in enumerate(c.rows.tolist()):
            first = starts[b] if j == 0 else lens[b] - 1 + j
            last = lens[b] - 1 + j
            assert s.positions[qsl[i] : qsl[i + 1]].tolist() == list(range(first, last + 1))
            assert int(s.seq_lens[i]) == last + 1
            for row in range(qsl[i], qsl[i + 1]):
                pos = int(s.positions[row])
                block, offset = divmod(int(s.slot_mapping[row]), BS)
                assert offset == pos % BS
                own_scratch = range(POOL + b * scratch, POOL + (b + 1) * scratch)
                if pos < lens[b] - 1:  # computed by the target: its own block for it
                    assert block == tables[b][pos // BS]
                else:  # not computed yet: its own table past the computed part, or scratch
                    assert block in tables[b] or block in own_scratch
                    if block in tables[b]:
                        assert tables[b].index(block) == pos // BS
            # The row's block table maps every position it reads to the same blocks.
            row_table = s.block_tables[i].tolist()
            for p in range(last + 1):
                n = p // BS
                assert row_table[n] == (tables[b][n] if n < len(tables[b]) else
                                        POOL + b * scratch + n - len(tables[b]))  # fmt: skip


def test_catch_up_rows_stay_in_computed_blocks():
    from kestrel.spec.draft_chain import plan_catch_up

    runs = [np.array([5]), np.array([6, 7, 8])]
    step = plan_catch_up(runs, [3, 1], [[9], [2, 4]], block_size=BS)
    assert step.num_decodes == 1 and step.input_ids.tolist() == [5, 6, 7, 8]
    assert step.positions.tolist() == [3, 1, 2, 3]
    assert step.slot_mapping.tolist() == [9 * BS + 3, 2 * BS + 1, 2 * BS + 2, 2 * BS + 3]
    assert step.logits_indices.shape == (0,)
    with pytest.raises(ValueError, match="leaves its 1 blocks"):
        plan_catch_up([np.array([1, 2])], [3], [[9]], block_size=BS)
