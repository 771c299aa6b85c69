"""PagedAttentionBackend on the GPU: the decode split follows the batch's real longest context,
planned calls equal hand-planned ones bit for bit, graphs replay a planned step, and a kernel
fallback under capture is an error."""

from __future__ import annotations

import pytest
import torch

from kestrel.ops import paged_attention
from kestrel.ops.attention_backend import PagedAttentionBackend
from kestrel.ops.attention_cuda import MIN_SPLIT_TOKENS, decode_plan
from tests.kernels.helpers import make_paged_batch

pytestmark = pytest.mark.cuda

HQ, HKV, D = 28, 4, 128  # Qwen2.5-7B heads


def _backend(block_size: int = 16) -> PagedAttentionBackend:
    return PagedAttentionBackend(
        num_q_heads=HQ,
        num_kv_heads=HKV,
        head_dim=D,
        block_size=block_size,
        dtype=torch.bfloat16,
        device=torch.device("cuda", torch.cuda.current_device()),
    )


@pytest.mark.parametrize("context", [100, 2048, 8192])
def test_split_follows_the_real_longest_context(context):
    backend = _backend()
    assert backend.kernels
    batch = make_paged_batch(
        [(1, context)] * 4,
        4,
        HQ,
        HKV,
        D,
        torch.bfloat16,
        torch.Generator(device="cuda").manual_seed(1),
    )
    plan = backend.plan(batch.metadata).plan
    assert plan.decode_splits == decode_plan(batch.q, HKV, 4, context)
    assert plan.decode_min_split_len == MIN_SPLIT_TOKENS
    if plan.decode_splits > 1:
        assert plan.workspace is not None
        assert plan.workspace.numel() >= plan.decode_splits * 4 * HQ * (D + 1)


def test_planned_equals_hand_planned_bitwise():
    lens = [(1, 700), (1, 33), (1, 4100), (57, 57), (9, 300)]
    batch = make_paged_batch(
        lens, 3, HQ, HKV, D, torch.bfloat16, torch.Generator(device="cuda").manual_seed(2)
    )
    planned = _backend().plan(batch.metadata)
    got = paged_attention(batch.q, batch.key_cache, batch.value_cache, planned, D**-0.5)
    want = paged_attention(batch.q, batch.key_cache, batch.value_cache, batch.metadata, D**-0.5)
    assert torch.equal(got, want)


def test_graph_replays_a_planned_step():
    backend = _backend()
    batch = make_paged_batch(
        [(1, 900)] * 8, 8, HQ, HKV, D, torch.bfloat16, torch.Generator(device="cuda").manual_seed(3)
    )
    planned = backend.plan(batch.metadata)
    eager = paged_attention(batch.q, batch.key_cache, batch.value_cache, planned, D**-0.5)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        captured = paged_attention(batch.q, batch.key_cache, batch.value_cache, planned, D**-0.5)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


def test_fallback_under_capture_is_an_error():
    backend = _backend()
    batch = make_paged_batch(
        [(1, 64)] * 2, 2, HQ, HKV, D, torch.bfloat16, torch.Generator(device="cuda").manual_seed(4)
    )
    planned = backend.plan(batch.metadata)
    odd_cache = batch.key_cache.transpose(0, 1).contiguous().transpose(0, 1)  # not contiguous
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with (
        pytest.raises(RuntimeError, match="under capture"),
        torch.cuda.stream(stream),
        torch.cuda.graph(graph, stream=stream),
    ):
        paged_attention(batch.q, odd_cache, batch.value_cache, planned, D**-0.5)
    torch.cuda.synchronize()
