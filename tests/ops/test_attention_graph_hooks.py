"""The attention backend's CUDA-graph hooks on CPU tensors: the static buffers a decode graph
reads, the metadata it is captured with (planned once per size) and the replay copy with its
padding rows (slot -1, seq_len 1, block 0). The reference attention over the replayed buffers
equals attention over the step's own metadata."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kestrel.executor.step_input import StepInput
from kestrel.ops import paged_attention
from kestrel.ops.attention_backend import PagedAttentionBackend
from kestrel.runner.staging import HostStager
from tests.ops.test_ref_attention import _make_batch

BLOCK = 4
MAX_BS, MAX_BLOCKS = 8, 8  # contexts up to 32 tokens


def _backend() -> PagedAttentionBackend:
    backend = PagedAttentionBackend(
        num_q_heads=4,
        num_kv_heads=2,
        head_dim=8,
        block_size=BLOCK,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )
    backend.init_graph_buffers(MAX_BS, MAX_BLOCKS)
    return backend


def _step(seq_lens: list[int], width: int, seed: int = 0) -> StepInput:
    """A decode-only step of len(seq_lens) requests with random slots and block tables."""
    rng = np.random.default_rng(seed)
    n = len(seq_lens)
    return StepInput(
        input_ids=rng.integers(0, 100, n).astype(np.int64),
        positions=np.array(seq_lens, dtype=np.int64) - 1,
        slot_mapping=rng.integers(0, 1000, n).astype(np.int64),
        query_start_loc=np.arange(n + 1, dtype=np.int32),
        seq_lens=np.array(seq_lens, dtype=np.int32),
        block_tables=rng.integers(1, 50, (n, width)).astype(np.int32),
        logits_indices=np.arange(n, dtype=np.int64),
        num_decodes=n,
        max_query_len=1,
        max_seq_len=max(seq_lens),
        max_blocks_per_seq=width,
    )


def test_capture_metadata_views_the_buffers_and_is_planned_once():
    backend = _backend()
    meta = backend.capture_metadata(4, MAX_BLOCKS * BLOCK)
    assert backend.capture_metadata(4, MAX_BLOCKS * BLOCK) is meta  # one plan per size
    assert meta.plan is not None and meta.num_decodes == 4 and meta.max_seq_len == 32
    g = backend._graph_buffers()
    for name in ("slot_mapping", "seq_lens", "block_tables"):
        assert getattr(meta, name).data_ptr() == getattr(g, name).data_ptr()
        assert getattr(meta, name).shape[0] == 4
    assert meta.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    assert meta.seq_lens_cpu.tolist() == [32] * 4  # the longest context the graph serves
    assert backend.capture_metadata(2, 24) is not meta
    with pytest.raises(ValueError, match="outside"):
        backend.capture_metadata(MAX_BS + 1, 24)


def test_prepare_replay_copies_the_step_and_pads_the_bucket():
    backend = _backend()
    stage = HostStager(torch.device("cpu")).to_device
    first = _step([5, 9, 24, 1, 13], width=MAX_BLOCKS, seed=1)
    backend.prepare_replay(first, 8, stage)
    g = backend._graph_buffers()
    assert g.slot_mapping[:5].tolist() == first.slot_mapping.tolist()
    assert g.seq_lens[:5].tolist() == first.seq_lens.tolist()
    assert torch.equal(g.block_tables[:5], torch.from_numpy(first.block_tables))
    assert g.slot_mapping[5:].tolist() == [-1] * 3
    assert g.seq_lens[5:].tolist() == [1] * 3
    assert g.block_tables[5:, 0].tolist() == [0] * 3
    # A smaller step into a smaller bucket, with narrower block tables: rows 2..4 are padding
    # now; rows past the bucket keep what they held (the 4-row graph does not read them).
    second = _step([3, 7], width=2, seed=2)
    backend.prepare_replay(second, 4, stage)
    assert g.slot_mapping[:4].tolist() == [*second.slot_mapping.tolist(), -1, -1]
    assert g.seq_lens[:4].tolist() == [3, 7, 1, 1]
    assert torch.equal(g.block_tables[:2, :2], torch.from_numpy(second.block_tables))
    assert g.block_tables[2:4, 0].tolist() == [0, 0]
    assert g.seq_lens[4:5].tolist() == [13]


def test_prepare_replay_rejects_what_a_graph_cannot_serve():
    backend = _backend()
    stage = HostStager(torch.device("cpu")).to_device
    with pytest.raises(ValueError, match="graph replay"):
        backend.prepare_replay(_step([3, 4, 5], width=2), 2, stage)  # bucket too small
    with pytest.raises(ValueError, match="graph replay"):
        backend.prepare_replay(_step([3], width=MAX_BLOCKS + 1), 1, stage)  # table too wide
    with pytest.raises(RuntimeError, match="init_graph_buffers"):
        PagedAttentionBackend(
            num_q_heads=4, num_kv_heads=2, head_dim=8, block_size=BLOCK,
            dtype=torch.float32, device=torch.device("cpu"),
        ).capture_metadata(1, 8)  # fmt: skip


def test_replayed_metadata_gives_the_steps_attention():
    """Decode attention over the graph's metadata (planned for 32 tokens) after a replay copy
    equals attention over the step's own metadata, for two different sets of lengths."""
    backend = _backend()
    stage = HostStager(torch.device("cpu")).to_device
    bs = 8
    meta = backend.capture_metadata(bs, MAX_BLOCKS * BLOCK)
    for seed, lens in enumerate(([1, 5, 24, 9, 16], [2, 2, 23, 4, 8, 3, 1])):
        batch = _make_batch([(1, s) for s in lens], len(lens), BLOCK, 4, 2, 8, torch.float32, seed)
        n, width = len(lens), batch.metadata.block_tables.shape[1]
        assert width <= MAX_BLOCKS
        step = StepInput(
            input_ids=np.zeros(n, dtype=np.int64),
            positions=np.array(lens, dtype=np.int64) - 1,
            slot_mapping=batch.metadata.slot_mapping.numpy(),
            query_start_loc=np.arange(n + 1, dtype=np.int32),
            seq_lens=np.array(lens, dtype=np.int32),
            block_tables=batch.metadata.block_tables.numpy(),
            logits_indices=np.arange(n, dtype=np.int64),
            num_decodes=n,
            max_query_len=1,
            max_seq_len=max(lens),
            max_blocks_per_seq=width,
        )
        backend.prepare_replay(step, bs, stage)
        q = torch.cat([batch.q, torch.randn(bs - n, 4, 8)])  # padding query rows
        got = paged_attention(q, batch.key_cache, batch.value_cache, meta, 0.3)
        want = paged_attention(batch.q, batch.key_cache, batch.value_cache, batch.metadata, 0.3)
        torch.testing.assert_close(got[:n], want, rtol=1e-6, atol=1e-6)
        assert bool(torch.isfinite(got[n:]).all())  # padding rows read block 0: valid memory
