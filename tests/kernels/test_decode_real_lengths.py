"""Decode attention split by each sequence's real length: the grid's num_splits is planned for a
long max_seq_len (as a CUDA graph plans for max_model_len) while the real contexts are short and
mixed. The output must equal the fp32 oracle, and the split workspace shows which splits ran:
exactly the ones `decode_valid_splits` (the Python mirror of the kernels' formula) names. The same
inside a CUDA graph captured through the backend's hooks and replayed with other lengths."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kestrel.executor.step_input import StepInput
from kestrel.ops import attention_cuda, paged_attention
from kestrel.ops.attention_backend import PagedAttentionBackend
from kestrel.ops.attention_cuda import MIN_SPLIT_TOKENS, decode_valid_splits
from tests.kernels.helpers import DTYPES, assert_close, dense_attention, make_paged_batch

pytestmark = pytest.mark.cuda

GROUPS = [(8, 8), (8, 4), (28, 4), (32, 4)]  # GQA group sizes 1, 2, 7, 8
LONG = 32768  # the planned longest context (a graph's max_model_len)
LENS = [1, 2, 63, 64, 65, 200, 1000, 1, 4097, 128, 700, 3000]  # the real ones


@pytest.fixture(params=["tc", "cuda_cores"])
def decode_kernel(request, monkeypatch) -> str:
    """The tensor-core decode for every GQA group >= 2, or the CUDA-core decode for all."""
    monkeypatch.setattr(attention_cuda, "TC_MIN_GROUP", 2 if request.param == "tc" else 1000)
    return request.param


def _backend(batch, num_q_heads, num_kv_heads, head_dim, dtype) -> PagedAttentionBackend:
    return PagedAttentionBackend(
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=batch.key_cache.shape[1],
        dtype=dtype,
        device=batch.q.device,
        allocate_in_capture=True,
    )


def _valid_split_rows(workspace, splits, lens, num_q_heads, head_dim):
    """[splits, num_seqs] bool: which (split, sequence) partial LSEs were written (not NaN)."""
    rows = splits * len(lens) * num_q_heads
    lse = workspace[rows * head_dim : rows * head_dim + rows].view(splits, len(lens), num_q_heads)
    written = ~torch.isnan(lse)
    assert bool((written == written[..., :1]).all()), "every head of a split runs or none does"
    return written[..., 0].cpu()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", GROUPS)
def test_long_plan_short_contexts(
    dtype, head_dim, num_q_heads, num_kv_heads, decode_kernel, gen, spy, poison
):
    lens = [(1, s) for s in LENS]
    batch = make_paged_batch(lens, len(lens), num_q_heads, num_kv_heads, head_dim, dtype, gen)
    metadata = dataclasses.replace(batch.metadata, max_seq_len=LONG)
    backend = _backend(batch, num_q_heads, num_kv_heads, head_dim, dtype)
    planned = backend.plan(metadata)
    plan = planned.plan
    assert plan.use_kernels and plan.decode_min_split_len == MIN_SPLIT_TOKENS
    assert plan.decode_splits == attention_cuda.decode_plan(batch.q, num_kv_heads, len(lens), LONG)
    assert plan.decode_splits > 1
    scale = head_dim**-0.5
    out = paged_attention(batch.q, batch.key_cache, batch.value_cache, planned, scale)
    assert spy.calls["paged_decode_attention"] == 1
    assert_close(out, dense_attention(batch, scale), dtype, f"decode ({decode_kernel})")
    # The workspace starts NaN (poison): a split's LSE is written iff the kernel ran it.
    written = _valid_split_rows(plan.workspace, plan.decode_splits, LENS, num_q_heads, head_dim)
    for i, seq_len in enumerate(LENS):
        nvalid = decode_valid_splits(seq_len, plan.decode_splits, plan.decode_min_split_len)
        want = torch.arange(plan.decode_splits) < nvalid
        assert torch.equal(written[:, i], want), f"seq_len {seq_len}: splits run {written[:, i]}"


def _decode_step(lens: list[int], tables: torch.Tensor) -> StepInput:
    """A decode-only step over the first len(lens) rows of `tables` (no KV writes)."""
    n = len(lens)
    return StepInput(
        input_ids=np.zeros(n, dtype=np.int64),
        positions=np.array(lens, dtype=np.int64) - 1,
        slot_mapping=np.full(n, -1, dtype=np.int64),
        query_start_loc=np.arange(n + 1, dtype=np.int32),
        seq_lens=np.array(lens, dtype=np.int32),
        block_tables=tables[:n].cpu().numpy(),
        logits_indices=np.arange(n, dtype=np.int64),
        num_decodes=n,
        max_query_len=1,
        max_seq_len=max(lens),
        max_blocks_per_seq=int(tables.shape[1]),
    )


def _oracle(batch, lens: list[int], scale: float) -> torch.Tensor:
    """fp32 attention of rows 0..n-1 over the first lens[i] tokens of sequence i."""
    n = len(lens)
    short = dataclasses.replace(
        batch,
        q=batch.q[:n],
        keys=[k[:s] for k, s in zip(batch.keys, lens)],
        values=[v[:s] for v, s in zip(batch.values, lens)],
        metadata=SimpleNamespace(query_start_loc_cpu=torch.arange(n + 1, dtype=torch.int32)),
    )
    return dense_attention(short, scale)


# The contexts the cache holds (one graph bucket of 8 rows), then the steps replayed: each row's
# real length at most what the cache holds for it; fewer rows than the bucket are padding.
HELD = [4100, 3000, 1500, 700, 300, 64, 2, 1]
STEPS = [HELD, [1, 65, 1000, 700, 17], [4100, 1, 129], [2, 3000, 1, 64, 300, 63, 2, 1]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_q_heads,num_kv_heads", GROUPS)
def test_graph_planned_long_replays_real_lengths(
    dtype, num_q_heads, num_kv_heads, decode_kernel, gen, spy
):
    head_dim, bs = 128, len(HELD)
    scale = head_dim**-0.5
    held = [(1, s) for s in HELD]
    batch = make_paged_batch(held, bs, num_q_heads, num_kv_heads, head_dim, dtype, gen)
    tables = batch.metadata.block_tables
    block_size = batch.key_cache.shape[1]
    backend = _backend(batch, num_q_heads, num_kv_heads, head_dim, dtype)
    backend.init_graph_buffers(bs, LONG // block_size)
    metadata = backend.capture_metadata(bs, LONG)  # planned once, for the long context
    assert metadata.plan.decode_splits > 1

    def stage(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).cuda()

    def attend() -> torch.Tensor:
        return paged_attention(batch.q, batch.key_cache, batch.value_cache, metadata, scale)

    backend.prepare_replay(_decode_step(STEPS[0], tables), bs, stage)
    attend()  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        captured = attend()
    torch.cuda.current_stream().wait_stream(stream)
    for lens in STEPS:
        backend.prepare_replay(_decode_step(lens, tables), bs, stage)
        graph.replay()
        eager = attend()  # the same launch outside the graph
        torch.cuda.synchronize()
        n = len(lens)
        assert torch.equal(captured[:n], eager[:n]), f"replay != eager for {lens}"
        assert_close(captured[:n], _oracle(batch, lens, scale), dtype, f"replay {lens}")
    assert spy.calls["paged_decode_attention"] == 2 + len(STEPS)
