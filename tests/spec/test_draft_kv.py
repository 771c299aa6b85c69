"""DraftKV: which rows of a step the draft model runs over, and where its KV is valid."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from kestrel.spec.draft_kv import DraftKV


def step(seq_ids, context_lens, query_lens, preempted=()):
    """A SchedulerOutput-shaped object: decodes (query length 1) first."""
    q = np.asarray(query_lens)
    ctx = np.asarray(context_lens)
    qsl = np.concatenate(([0], np.cumsum(q))).astype(np.int32)
    positions = np.concatenate([np.arange(c, c + n) for c, n in zip(ctx, q)])
    return SimpleNamespace(
        seq_ids=np.asarray(seq_ids, dtype=np.int64),
        context_lens=ctx.astype(np.int32),
        seq_lens=(ctx + q).astype(np.int32),
        query_start_loc=qsl,
        input_ids=positions + 1000,
        positions=positions.astype(np.int32),
        slot_mapping=positions.astype(np.int64) + 10_000,
        block_tables=np.arange(len(q) * 3, dtype=np.int32).reshape(len(q), 3),
        logits_indices=(qsl[1:] - 1).astype(np.int32),
        num_decodes=int((q == 1).sum()),
        max_query_len=int(q.max()),
        max_seq_len=int((ctx + q).max()),
        max_blocks_per_seq=3,
        placeholder_rows=np.zeros(0, dtype=np.int32),
        placeholder_src=np.zeros(0, dtype=np.int32),
        preempted_seq_ids=np.asarray(preempted, dtype=np.int64),
    )


def test_plain_decodes_of_known_sequences_that_do_not_draft_are_left_out():
    kv = DraftKV()
    # Step 1: three prefills (all mirrored; seq 2's starts after a 4-token prefix hit).
    first = kv.rows_to_mirror(step([0, 1, 2], [0, 0, 4], [5, 3, 2]), chained=set())
    assert first is not None and first.num_tokens == 10
    assert kv.valid == {0: 5, 1: 3, 2: 6}
    # Step 2: decodes of 0 and 1 (1 drafts: kept), a verify of 2 (4 rows); seq 7 is unknown.
    sub = kv.rows_to_mirror(step([0, 1, 7, 2], [5, 3, 9, 6], [1, 1, 1, 4]), chained={1})
    assert sub.seq_lens.tolist() == [4, 10, 10] and sub.num_decodes == 2
    assert sub.positions.tolist() == [3, 9, 6, 7, 8, 9]
    assert sub.input_ids.tolist() == [1003, 1009, 1006, 1007, 1008, 1009]
    assert sub.block_tables.tolist() == [[3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert kv.valid == {0: 5, 1: 4, 2: 10, 7: 10}
    # Seq 0 lags: a chain over it starts at 5 (its newest token is at 6), then it is current.
    assert kv.start_of(0, 7) == 5 and kv.start_of(2, 8) == 7  # capped after a rollback
    kv.caught_up(0, 7)
    assert kv.start_of(0, 7) == 6
    # Nothing left to mirror: None. A preempted sequence is forgotten.
    assert kv.rows_to_mirror(step([0], [6], [1], preempted=[2]), chained=set()) is None
    assert 2 not in kv.valid
    kv.retain([0, 1])
    assert set(kv.valid) == {0, 1}


def test_mirrored_rows_after_a_gap_do_not_claim_validity():
    kv = DraftKV()
    kv.valid[3] = 4
    sub = kv.rows_to_mirror(step([3], [8], [3]), chained={3})
    assert sub is not None and kv.valid[3] == 4  # positions 4..7 are still stale
