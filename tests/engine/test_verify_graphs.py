"""Which steps the speculative verify graphs take (runner/verify_graphs.py), on the CPU: uniform
verify steps only. Capture and replay are tested on a GPU (tests/gpu/test_verify_graphs_gpu.py)."""

from __future__ import annotations

import numpy as np
import pytest

from kestrel.executor.step_input import StepInput
from kestrel.runner.verify_graphs import VerifyGraphs, verify_batch_sizes


def _step(query_lens, sampled=None, blocks=2) -> StepInput:
    n, rows = len(query_lens), sum(query_lens)
    qsl = np.concatenate(([0], np.cumsum(query_lens))).astype(np.int32)
    return StepInput(
        input_ids=np.zeros(rows, np.int64),
        positions=np.arange(rows, dtype=np.int64),
        slot_mapping=np.arange(rows, dtype=np.int64),
        query_start_loc=qsl,
        seq_lens=np.full(n, 20, np.int32),
        block_tables=np.zeros((n, blocks), np.int32),
        logits_indices=np.arange(rows) if sampled is None else np.asarray(sampled),
        num_decodes=sum(1 for q in query_lens if q == 1),
        max_query_len=max(query_lens),
        max_seq_len=20,
        max_blocks_per_seq=blocks,
    )


@pytest.fixture()
def graphs():
    return VerifyGraphs(
        None, [], None, max_num_seqs=16, num_speculative_tokens=4, max_model_len=64,
        block_size=16, device="cpu",
    )  # fmt: skip


def test_sizes(graphs):
    assert verify_batch_sizes(16) == [1, 2, 4, 8]
    assert verify_batch_sizes(3) == [1, 2, 3]
    assert verify_batch_sizes(1) == [1]
    assert graphs.query_lens == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        VerifyGraphs(None, [], None, max_num_seqs=1, num_speculative_tokens=0,
                     max_model_len=8, block_size=4, device="cpu")  # fmt: skip


def test_uniform_verify_steps_only(graphs):
    assert graphs.can_run(_step([5]))
    assert graphs.can_run(_step([3, 3, 3]))
    assert graphs.can_run(_step([2] * 8))
    assert not graphs.can_run(_step([2] * 9))  # more requests than the largest graph
    assert not graphs.can_run(_step([6]))  # more drafts than captured
    assert not graphs.can_run(_step([1, 1]))  # decodes: the decode graphs' steps
    assert not graphs.can_run(_step([3, 2]))  # draft counts differ
    assert not graphs.can_run(_step([5], sampled=[4]))  # a prefill chunk: last row sampled
    assert not graphs.can_run(_step([3], sampled=[0, 2, 1]))  # rows out of order
    assert not graphs.can_run(_step([3], blocks=5))  # wider block table than captured
