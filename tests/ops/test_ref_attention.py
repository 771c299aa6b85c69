"""Paged attention reference against per-sequence dense causal attention on contiguous K/V."""

from dataclasses import dataclass

import pytest
import torch

from kestrel.ops import (
    AttentionMetadata,
    paged_attention,
    paged_decode_attention,
    paged_prefill_attention,
    write_kv_cache,
)

# (query_len, seq_len) per sequence; the first NUM_DECODES are decodes.
MIXED = [(1, 1), (1, 17), (1, 33), (1, 50), (17, 50), (33, 33), (1, 17), (16, 16), (4, 37)]
NUM_DECODES = 4


@dataclass
class Batch:
    q: torch.Tensor  # [num_tokens, num_q_heads, head_dim]
    keys: list[torch.Tensor]  # per seq: [seq_len, num_kv_heads, head_dim] (ground truth)
    values: list[torch.Tensor]
    key_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor
    metadata: AttentionMetadata


def _make_batch(
    lens: list[tuple[int, int]],
    num_decodes: int,
    block_size: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    seed: int,
    scatter_new_tokens: bool = True,
) -> Batch:
    """Random contiguous K/V per sequence, scattered into a cache through a shuffled block table.

    Every cache row not holding real context (spare blocks, tails of last blocks) is random
    garbage, and padded block-table entries are -1 or a huge id, so any wrong gather shows up.
    """
    gen = torch.Generator().manual_seed(seed)
    query_lens = [q for q, _ in lens]
    seq_lens = [s for _, s in lens]
    blocks_needed = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_needed) + 3
    max_blocks = max(blocks_needed) + 2
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=gen).to(dtype)
    value_cache = torch.randn(shape, generator=gen).to(dtype)
    block_ids = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables = torch.empty(len(lens), max_blocks, dtype=torch.int32)
    keys, values, slots = [], [], []
    for seq, (query_len, seq_len) in enumerate(lens):
        block_tables[seq] = -1 if seq % 2 else 10**6  # padding; overwritten where used
        used = [block_ids.pop() for _ in range(blocks_needed[seq])]
        block_tables[seq, : len(used)] = torch.tensor(used, dtype=torch.int32)
        k = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        keys.append(k)
        values.append(v)
        positions = torch.arange(seq_len)
        rows = block_tables[seq, positions // block_size].long()
        written = positions if scatter_new_tokens else positions[: seq_len - query_len]
        key_cache[rows[written], written % block_size] = k[written]
        value_cache[rows[written], written % block_size] = v[written]
        new_positions = positions[seq_len - query_len :]
        slots.append(rows[new_positions] * block_size + new_positions % block_size)
    num_tokens = sum(query_lens)
    q = torch.randn(num_tokens, num_q_heads, head_dim, generator=gen).to(dtype)
    query_start_loc = torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0).int()
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    metadata = AttentionMetadata(
        slot_mapping=torch.cat(slots).long(),
        query_start_loc=query_start_loc,
        seq_lens=seq_lens_t,
        block_tables=block_tables,
        num_decodes=num_decodes,
        num_decode_tokens=num_decodes,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=query_start_loc.clone(),
        seq_lens_cpu=seq_lens_t.clone(),
    )
    return Batch(q, keys, values, key_cache, value_cache, metadata)


def _dense_causal_attention(batch: Batch, scale: float) -> torch.Tensor:
    """fp64, one query token at a time, on the contiguous ground-truth K/V."""
    num_q_heads = batch.q.shape[1]
    out = torch.empty(batch.q.shape, dtype=torch.float64)
    starts = batch.metadata.query_start_loc_cpu.tolist()
    for seq, (k, v) in enumerate(zip(batch.keys, batch.values)):
        group = num_q_heads // k.shape[1]
        k64 = k.double().repeat_interleave(group, dim=1)  # [seq_len, num_q_heads, head_dim]
        v64 = v.double().repeat_interleave(group, dim=1)
        seq_len, query_len = k.shape[0], starts[seq + 1] - starts[seq]
        for j in range(query_len):
            row, position = starts[seq] + j, seq_len - query_len + j
            scores = torch.einsum("hd,lhd->hl", batch.q[row].double(), k64[: position + 1])
            probs = torch.softmax(scores * scale, dim=-1)  # [num_q_heads, position + 1]
            out[row] = torch.einsum("hl,lhd->hd", probs, v64[: position + 1])
    return out


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    # fp32: accumulation error only. bf16: one final rounding (half an ulp, 2^-9 relative).
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-3, "rtol": 4e-3}


@pytest.mark.parametrize("block_size", [16, 4])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 4), (4, 2), (8, 2)])
def test_mixed_batch_fp32(block_size, num_q_heads, num_kv_heads):
    batch = _make_batch(
        MIXED,
        NUM_DECODES,
        block_size,
        num_q_heads,
        num_kv_heads,
        32,
        torch.float32,
        seed=block_size * 100 + num_q_heads * 10 + num_kv_heads,
    )
    scale = 32**-0.5
    got = paged_attention(batch.q, batch.key_cache, batch.value_cache, batch.metadata, scale)
    assert got.shape == batch.q.shape and got.dtype == torch.float32
    torch.testing.assert_close(
        got.double(), _dense_causal_attention(batch, scale), **_tolerance(torch.float32)
    )


@pytest.mark.parametrize("block_size", [16, 4])
def test_mixed_batch_bf16(block_size):
    batch = _make_batch(MIXED, NUM_DECODES, block_size, 8, 2, 64, torch.bfloat16, seed=block_size)
    scale = 64**-0.5
    got = paged_attention(batch.q, batch.key_cache, batch.value_cache, batch.metadata, scale)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(
        got.double(), _dense_causal_attention(batch, scale), **_tolerance(torch.bfloat16)
    )


@pytest.mark.parametrize(
    "lens,num_decodes",
    [
        ([(1, 1), (1, 50), (1, 17), (1, 33), (1, 4)], 5),  # decodes only
        ([(17, 50), (1, 1), (50, 50), (3, 4)], 0),  # prefill chunks only
    ],
)
def test_pure_batches(lens, num_decodes):
    batch = _make_batch(lens, num_decodes, 4, 4, 2, 16, torch.float32, seed=len(lens))
    got = paged_attention(batch.q, batch.key_cache, batch.value_cache, batch.metadata, 0.3)
    torch.testing.assert_close(
        got.double(), _dense_causal_attention(batch, 0.3), **_tolerance(torch.float32)
    )


def test_split_kernels_fill_only_their_slice():
    batch = _make_batch(MIXED, NUM_DECODES, 16, 8, 4, 32, torch.float32, seed=77)
    meta, scale = batch.metadata, 32**-0.5
    want = _dense_causal_attention(batch, scale)
    decode_rows = meta.num_decode_tokens
    out = torch.full_like(batch.q, float("nan"))
    paged_decode_attention(
        batch.q[:decode_rows], batch.key_cache, batch.value_cache, meta, scale, out[:decode_rows]
    )
    assert torch.isnan(out[decode_rows:]).all()
    torch.testing.assert_close(out[:decode_rows].double(), want[:decode_rows], atol=1e-5, rtol=1e-5)
    paged_prefill_attention(
        batch.q[decode_rows:], batch.key_cache, batch.value_cache, meta, scale, out[decode_rows:]
    )
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_padded_q_rows_are_zero():
    batch = _make_batch(MIXED, NUM_DECODES, 4, 4, 4, 16, torch.float32, seed=5)
    num_tokens = batch.q.shape[0]
    padded_q = torch.cat([batch.q, torch.randn(3, 4, 16)])
    got = paged_attention(padded_q, batch.key_cache, batch.value_cache, batch.metadata, 0.25)
    assert torch.equal(got[num_tokens:], torch.zeros(3, 4, 16))
    torch.testing.assert_close(
        got[:num_tokens].double(), _dense_causal_attention(batch, 0.25), atol=1e-5, rtol=1e-5
    )


def test_write_then_attend_end_to_end():
    """Cache holds only the cached prefixes; this step's K/V go in through write_kv_cache."""
    batch = _make_batch(
        MIXED, NUM_DECODES, 4, 8, 2, 32, torch.float32, seed=21, scatter_new_tokens=False
    )
    meta = batch.metadata
    starts = meta.query_start_loc_cpu.tolist()
    new_k = torch.cat(
        [k[k.shape[0] - (starts[i + 1] - starts[i]) :] for i, k in enumerate(batch.keys)]
    )
    new_v = torch.cat(
        [v[v.shape[0] - (starts[i + 1] - starts[i]) :] for i, v in enumerate(batch.values)]
    )
    before = paged_attention(batch.q, batch.key_cache, batch.value_cache, meta, 0.2)
    want = _dense_causal_attention(batch, 0.2)
    assert not torch.allclose(before.double(), want, atol=1e-3), "new K/V must matter"
    write_kv_cache(new_k, new_v, batch.key_cache, batch.value_cache, meta.slot_mapping)
    got = paged_attention(batch.q, batch.key_cache, batch.value_cache, meta, 0.2)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_attention_errors():
    batch = _make_batch(MIXED, NUM_DECODES, 4, 4, 4, 16, torch.float32, seed=1)
    meta = batch.metadata
    with pytest.raises(ValueError, match=r"num_q_heads \(3\).*num_kv_heads \(4\)"):
        paged_attention(
            torch.randn(batch.q.shape[0], 3, 16), batch.key_cache, batch.value_cache, meta, 1.0
        )
    with pytest.raises(ValueError, match="head_dim"):
        paged_attention(
            torch.randn(batch.q.shape[0], 4, 8), batch.key_cache, batch.value_cache, meta, 1.0
        )
    meta.num_decodes = meta.num_decode_tokens = 5  # sequence 4 has query_len 17
    with pytest.raises(ValueError, match="query_len 1"):
        paged_attention(batch.q, batch.key_cache, batch.value_cache, meta, 1.0)
    meta.num_decodes = meta.num_decode_tokens = NUM_DECODES
    meta.block_tables = meta.block_tables[:, :2]
    with pytest.raises(ValueError, match="cannot hold the longest sequence"):
        paged_attention(batch.q, batch.key_cache, batch.value_cache, meta, 1.0)
