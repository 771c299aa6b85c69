"""Decode attention split by each sequence's real length: the grid's num_splits is planned for a
long max_seq_len (as a CUDA graph plans for max_model_len) while the real contexts are short and
mixed. The output must equal the fp32 oracle, and the split workspace shows which splits ran:
exactly the ones `decode_valid_splits` (the Python mirror of the kernels' formula) names."""

from __future__ import annotations

import dataclasses

import pytest
import torch

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
