"""Paged attention reference: causal attention of this step's queries over a paged KV cache.

KV cache layout, per layer: key_cache and value_cache, each
[num_blocks, block_size, num_kv_heads, head_dim]. Token position p of sequence i lives at
block block_tables[i, p // block_size], offset p % block_size.

Batch layout: the first `num_decodes` sequences are decodes (one query token each, rows
[0, num_decode_tokens) of q); the remaining sequences are prefill chunks, possibly with a cached
prefix. The query tokens of a sequence are the LAST query_len positions of its context.

A float8 e4m3 cache (ops/kv_quant.py) holds K / k_scale and V / v_scale: the reference
dequantizes the blocks it gathers (code * scale, in fp32); scales of other caches are ignored.
"""

from __future__ import annotations

import torch

from kestrel.ops import _dispatch
from kestrel.ops.attention_backend import ad_hoc_plan
from kestrel.ops.attention_cuda import paged_attention_cuda
from kestrel.ops.attention_metadata import AttentionMetadata
from kestrel.ops.kv_quant import check_scale, dequantize_kv

__all__ = [
    "AttentionMetadata",
    "paged_attention",
    "paged_decode_attention",
    "paged_prefill_attention",
]


def _check_attention_args(
    q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, out: torch.Tensor
) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [num_tokens, num_q_heads, head_dim]; got {tuple(q.shape)}")
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(
            "key_cache and value_cache must both be [num_blocks, block_size, num_kv_heads, "
            f"head_dim]; got {tuple(key_cache.shape)} and {tuple(value_cache.shape)}"
        )
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = key_cache.shape[2]
    if key_cache.shape[3] != head_dim:
        raise ValueError(
            f"head_dim of q ({head_dim}) and of the cache ({key_cache.shape[3]}) differ"
        )
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
        )
    if out.shape != q.shape:
        raise ValueError(f"out must have q's shape {tuple(q.shape)}; got {tuple(out.shape)}")


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float
) -> torch.Tensor:
    """Masked softmax attention in fp32 for one group of queries.

    q [..., num_queries, num_q_heads, head_dim]; k, v [..., num_keys, num_kv_heads, head_dim];
    visible [..., num_queries, num_keys] bool (every query sees >= 1 key).
    Returns fp32 [..., num_queries, num_q_heads, head_dim]. q head h uses kv head h // group.
    """
    *batch, num_queries, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[-2]
    group = num_q_heads // num_kv_heads
    q5 = q.float().reshape(*batch, num_queries, num_kv_heads, group, head_dim)
    scores = torch.einsum("...qhgd,...khd->...hgqk", q5, k.float()) * scale
    scores = scores.masked_fill(~visible[..., None, None, :, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # [..., num_kv_heads, group, num_queries, num_keys]
    out = torch.einsum("...hgqk,...khd->...qhgd", probs, v.float())
    return out.reshape(*batch, num_queries, num_q_heads, head_dim)


def paged_decode_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    out: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Attention for the decode sequences (the first ``metadata.num_decodes``).

    Args:
        q: [num_decode_tokens, num_q_heads, head_dim], the decode rows of the batch's q
            (``q_all[:num_decode_tokens]``); row i is the single query of sequence i, at position
            seq_lens[i] - 1.
        key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_dim]; read only.
        metadata: the step's batch context (only decode sequences are read).
        scale: softmax scale applied to q.k (usually head_dim ** -0.5).
        out: same shape as q; written in place (cast to out.dtype). Returns None.
        k_scale, v_scale: an FP8 cache's dequantization scales (ignored for other caches).
    """
    _check_attention_args(q, key_cache, value_cache, out)
    num_decodes = metadata.num_decodes
    if q.shape[0] != num_decodes:
        raise ValueError(f"q must have num_decode_tokens = {num_decodes} rows; got {q.shape[0]}")
    if num_decodes == 0:
        return
    block_size = key_cache.shape[1]
    longest = int(metadata.seq_lens_cpu[:num_decodes].max())
    num_blocks = -(-longest // block_size)
    seq_lens = metadata.seq_lens[:num_decodes].long()  # [num_decodes]
    # Entries past a sequence's last block may hold anything; point them at block 0 (masked).
    block_idx = torch.arange(num_blocks, device=seq_lens.device)
    used = block_idx[None, :] * block_size < seq_lens[:, None]  # [num_decodes, num_blocks]
    table = metadata.block_tables[:num_decodes, :num_blocks].long()
    table = torch.where(used, table, torch.zeros_like(table))
    kv_shape = (num_decodes, num_blocks * block_size, *key_cache.shape[2:])
    # [num_decodes, max_len, num_kv_heads, head_dim] fp32
    k = dequantize_kv(key_cache[table].reshape(kv_shape), k_scale)
    v = dequantize_kv(value_cache[table].reshape(kv_shape), v_scale)
    positions = torch.arange(num_blocks * block_size, device=seq_lens.device)
    visible = (positions[None, :] < seq_lens[:, None])[:, None, :]  # [num_decodes, 1, max_len]
    result = _attend(q[:, None], k, v, visible, scale)  # [num_decodes, 1, num_q_heads, head_dim]
    out.copy_(result[:, 0])


def paged_prefill_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    out: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Causal attention for the prefill-chunk sequences (index >= ``metadata.num_decodes``).

    Args:
        q: [num_prefill_tokens, num_q_heads, head_dim], the prefill rows of the batch's q
            (``q_all[num_decode_tokens:num_tokens]``): row r is batch row num_decode_tokens + r.
            Query j of sequence i sits at position seq_lens[i] - query_len_i + j and attends to
            positions 0..that position (the cached prefix and the chunk's own earlier tokens,
            whose K/V must already be in the cache).
        key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_dim]; read only.
        metadata, scale, k_scale, v_scale: as in :func:`paged_decode_attention`.
        out: same shape as q; written in place (cast to out.dtype). Returns None.
    """
    _check_attention_args(q, key_cache, value_cache, out)
    if q.shape[0] != metadata.num_prefill_tokens:
        raise ValueError(
            f"q must have num_prefill_tokens = {metadata.num_prefill_tokens} rows; got {q.shape[0]}"
        )
    block_size = key_cache.shape[1]
    row_offset = metadata.num_decode_tokens
    starts = metadata.query_start_loc_cpu.tolist()
    lens = metadata.seq_lens_cpu.tolist()
    for seq in range(metadata.num_decodes, metadata.num_seqs):
        begin, end = starts[seq] - row_offset, starts[seq + 1] - row_offset
        query_len, seq_len = end - begin, lens[seq]
        if query_len == 0:
            continue
        num_blocks = -(-seq_len // block_size)
        blocks = metadata.block_tables[seq, :num_blocks].long()
        # [seq_len, num_kv_heads, head_dim] fp32
        k = dequantize_kv(key_cache[blocks].flatten(0, 1)[:seq_len], k_scale)
        v = dequantize_kv(value_cache[blocks].flatten(0, 1)[:seq_len], v_scale)
        q_pos = torch.arange(seq_len - query_len, seq_len, device=q.device)  # [query_len]
        kv_pos = torch.arange(seq_len, device=q.device)  # [seq_len]
        visible = kv_pos[None, :] <= q_pos[:, None]  # [query_len, seq_len]
        out[begin:end] = _attend(q[begin:end], k, v, visible, scale).to(out.dtype)


def _reference_fallback(q: torch.Tensor, key_cache: torch.Tensor) -> None:
    """A planned kernel call fell back to the reference: logged once; an error under CUDA graph
    capture (the reference synchronizes with the host)."""
    what = (
        f"q {q.dtype} with head_dim {q.shape[-1]}, cache {key_cache.dtype} "
        f"(contiguous: {key_cache.is_contiguous()})"
    )
    _dispatch.reference_fallback("paged attention", what)


def paged_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of a mixed batch (decodes first, then prefill chunks) over a paged cache.

    Args:
        q: [num_tokens_padded, num_q_heads, head_dim], float dtype, with num_tokens_padded >=
            metadata.num_tokens; num_q_heads is a multiple of num_kv_heads (GQA: q head h uses
            kv head h // (num_q_heads // num_kv_heads)).
        key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_dim]; read only. The
            K/V of every context position, this step's tokens included, must already be written.
        metadata: the step's batch context.
        scale: softmax scale applied to q.k.
        k_scale, v_scale: dequantization scales of a float8 e4m3 cache (K = code * k_scale;
            finite, > 0; ignored for a cache of another dtype).
        out: where to write the result (contiguous, q's shape, dtype and device); None: a new
            tensor.

    Returns:
        `out` or a new [num_tokens_padded, num_q_heads, head_dim] tensor in q's dtype; softmax
        and accumulation in fp32; padding rows (>= metadata.num_tokens) are zero.

    On CUDA fp16/bf16 inputs with head_dim 64, 128 or 256 (caches of q's dtype or float8
    e4m3, contiguous; q with head stride head_dim, any token stride; int32 metadata tensors)
    this runs the decode and prefill kernels, with no host synchronization (CUDA-graph
    capturable); other inputs run the reference below.
    """
    k_scale, v_scale = check_scale("k_scale", k_scale), check_scale("v_scale", v_scale)
    plan = metadata.plan
    if plan is None:  # metadata built by hand: validate and plan here, for this call
        metadata.validate(block_size=key_cache.shape[1])
        plan = ad_hoc_plan(q, key_cache, metadata)
    elif plan.block_size != key_cache.shape[1]:
        raise ValueError(
            f"the attention plan is for block_size {plan.block_size}; the cache has "
            f"{key_cache.shape[1]}"
        )
    num_tokens, num_decode_tokens = metadata.num_tokens, metadata.num_decode_tokens
    if q.dim() != 3 or q.shape[0] < num_tokens:
        raise ValueError(
            f"q must be [num_tokens >= {num_tokens}, num_q_heads, head_dim]; got {tuple(q.shape)}"
        )
    if out is not None and (
        out.shape != q.shape
        or out.dtype != q.dtype
        or out.device != q.device
        or not out.is_contiguous()
    ):
        raise ValueError(
            f"out must be a contiguous {q.dtype} tensor of q's shape {tuple(q.shape)} on "
            f"{q.device}; got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    if plan.use_kernels:
        _check_attention_args(q, key_cache, value_cache, q)
        kernel_out = paged_attention_cuda(
            q, key_cache, value_cache, metadata, scale, plan, k_scale, v_scale, out
        )
        if kernel_out is not None:
            return kernel_out
        _reference_fallback(q, key_cache)
    if out is None:
        out = torch.zeros_like(q)
    else:
        out.zero_()
    paged_decode_attention(
        q[:num_decode_tokens],
        key_cache,
        value_cache,
        metadata,
        scale,
        out[:num_decode_tokens],
        k_scale,
        v_scale,
    )
    paged_prefill_attention(
        q[num_decode_tokens:num_tokens],
        key_cache,
        value_cache,
        metadata,
        scale,
        out[num_decode_tokens:num_tokens],
        k_scale,
        v_scale,
    )
    return out
