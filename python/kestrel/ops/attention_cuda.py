"""CUDA path of paged attention: decode split planning and the launches of the decode kernel
(first ``num_decodes`` sequences) and the tensor-core prefill kernel (the rest), as an
:class:`~kestrel.ops.attention_backend.AttentionPlan` says (splits, workspace, variant).

Nothing here synchronizes with the device or depends on device-side values for launch shapes,
so a captured CUDA graph replays it; launch shapes depend on (num_decodes, heads, head_dim,
metadata.max_seq_len) and the prefill token/sequence counts, all host-side values.

Decode splits: the host plans only num_splits (the grid's z size) from max_seq_len; each
sequence's split length is computed on the device from its real seq_len
(:func:`decode_split_len` mirrors the kernels' formula), so a graph planned for max_model_len
spreads a short context over few full splits, not over one huge split.

FP8 (e4m3) caches: both decode kernels (CUDA cores; tensor cores for large GQA groups, as for
16-bit caches) and both prefill kernels (mma.sync; wgmma on sm_90, unless FP8_PREFILL_WGMMA is
False, which sends FP8 prefills to mma.sync) read them; the codes are widened to the query
dtype in registers or shared memory, exactly, and k_scale / v_scale applied.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from kestrel.ops import _dispatch
from kestrel.ops.kv_quant import FP8_KV_DTYPE, is_fp8

if TYPE_CHECKING:
    from kestrel.ops.attention_backend import AttentionPlan
    from kestrel.ops.attention_metadata import AttentionMetadata

SUPPORTED_HEAD_DIMS = (64, 128, 256)
# A decode split covers at least this many tokens (the kernels' min_split_len).
MIN_SPLIT_TOKENS = 64
# GQA groups of at least this many query heads per kv head decode on tensor cores (the heads are
# the rows of an mma tile); smaller groups use the CUDA-core kernel. On the H100 the tensor-core
# kernel was the faster one for groups 4 and 7 (docs/performance.md); 2 and 3 were not measured.
TC_MIN_GROUP = 4
# FP8 caches may take the wgmma prefill (sm_90); False runs their prefill on mma.sync.
FP8_PREFILL_WGMMA = True
# Split-planner cost of one wave of blocks beyond its tokens (launch, ramp, merge), in tokens.
WAVE_OVERHEAD_TOKENS = 32

# KESTREL_PREFILL_KERNEL picks the prefill kernel: "auto" (wgmma on sm_90 for head_dim 64/128,
# else mma.sync), "mma" or "wgmma" (for tests and benchmarks); read once into _dispatch.settings.
PREFILL_KERNEL_ENV = _dispatch.PREFILL_KERNEL_ENV
_PREFILL_VARIANTS = {"auto": 0, "mma": 1, "wgmma": 2}


def heads_per_block(group: int, head_dim: int) -> int:
    """Query heads one decode block serves for a GQA group size: 1, 2, 4 or 8 (CUDA-core kernel,
    larger groups take several blocks per kv head) or 16 (tensor-core kernel, head_dim <= 128,
    groups >= TC_MIN_GROUP); the same for 16-bit and FP8 caches."""
    if group >= TC_MIN_GROUP and head_dim <= 128:
        return 16
    for heads in (1, 2, 4):
        if group <= heads:
            return heads
    return 8


def decode_split_len(seq_len: int, num_splits: int, min_split_len: int = MIN_SPLIT_TOKENS) -> int:
    """Tokens per split of one sequence, as the decode kernels compute it on the device
    (`decode_split_len` in cuda/decode_attention.cuh): ceil(seq_len / num_splits), at least
    min_split_len. The sequence then fills decode_valid_splits() <= num_splits splits."""
    return max(min_split_len, -(-seq_len // num_splits))


def decode_valid_splits(
    seq_len: int, num_splits: int, min_split_len: int = MIN_SPLIT_TOKENS
) -> int:
    """Non-empty splits of one sequence (the merge kernel combines these many)."""
    return min(num_splits, -(-seq_len // decode_split_len(seq_len, num_splits, min_split_len)))


def decode_split_ranges(
    seq_len: int, num_splits: int, min_split_len: int = MIN_SPLIT_TOKENS
) -> list[tuple[int, int]]:
    """[start, end) token range of each of the num_splits splits of one sequence, as the kernel
    blocks of grid z = 0 .. num_splits - 1 take them (empty splits give start >= end)."""
    split_len = decode_split_len(seq_len, num_splits, min_split_len)
    return [(z * split_len, min(seq_len, (z + 1) * split_len)) for z in range(num_splits)]


@functools.lru_cache(maxsize=4096)
def plan_decode_splits(
    num_seqs: int,
    num_q_heads: int,
    num_kv_heads: int,
    max_seq_len: int,
    wave_blocks: int,
    heads: int,
) -> int:
    """num_splits (the decode grid's z size) for a decode batch whose longest context is
    max_seq_len, served by blocks of `heads` query heads.

    With s splits the grid has num_seqs * blocks_per_head * s blocks, run in waves of
    wave_blocks (resident blocks on the whole GPU); each block reads about max_seq_len / s
    tokens. The plan minimizes waves * (max_seq_len / s + WAVE_OVERHEAD_TOKENS) over splits of
    at least MIN_SPLIT_TOKENS, preferring fewer splits on ties. The kernels cut each sequence
    by its own length (decode_split_len): the longest one into num_splits splits of
    ceil(max_seq_len / num_splits) tokens, a shorter one into fewer, never shorter than
    MIN_SPLIT_TOKENS; so the plan for a long max_seq_len (a CUDA graph's) stays correct, and
    parallel, for short contexts.
    """
    group = num_q_heads // num_kv_heads
    per_split = max(1, num_seqs * num_kv_heads * -(-group // heads))
    max_seq_len = max(1, max_seq_len)
    wave_blocks = max(1, wave_blocks)
    best, best_cost = 1, float("inf")
    for splits in range(1, max(1, max_seq_len // MIN_SPLIT_TOKENS) + 1):
        waves = -(-per_split * splits // wave_blocks)
        cost = waves * (max_seq_len / splits + WAVE_OVERHEAD_TOKENS)
        if cost < best_cost * (1 - 1e-9):
            best, best_cost = splits, cost
    # No split of the longest sequence may be empty: with even splits of ceil(max / best)
    # tokens it fills ceil(max / that) <= best of them.
    return -(-max_seq_len // -(-max_seq_len // best))


@functools.cache
def _wave_blocks(
    device_index: int, head_dim: int, heads: int, dtype_code: int, kv_code: int
) -> int:
    kernels = _dispatch.kernels
    assert kernels is not None
    with torch.cuda.device(device_index):
        per_sm = kernels.paged_decode_blocks_per_sm(head_dim, heads, dtype_code, kv_code)
    return max(1, per_sm) * _dispatch.sm_count(device_index)


def kv_dtype_code(q_dtype: torch.dtype, cache_dtype: torch.dtype) -> int | None:
    """The kernels' kv_dtype code of a cache read with queries of q_dtype: q's own code, the
    FP8 code, or None when the kernels cannot read it."""
    if is_fp8(cache_dtype):
        return _dispatch.FP8_CODE
    return _dispatch.dtype_code(q_dtype) if cache_dtype == q_dtype else None


def decode_plan(
    q: torch.Tensor,
    num_kv_heads: int,
    num_decodes: int,
    max_seq_len: int,
    kv_dtype: torch.dtype | None = None,
) -> int:
    """The num_splits the decode kernel uses for this batch on q's device (each sequence's
    split length then follows its own seq_len on the device, see decode_split_len).
    kv_dtype: the cache's element type (default: q's)."""
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    code = _dispatch.dtype_code(q.dtype)
    kv_code = kv_dtype_code(q.dtype, q.dtype if kv_dtype is None else kv_dtype)
    assert code is not None and kv_code is not None and q.device.index is not None
    heads = heads_per_block(num_q_heads // num_kv_heads, head_dim)
    wave = _wave_blocks(q.device.index, head_dim, heads, code, kv_code)
    return plan_decode_splits(num_decodes, num_q_heads, num_kv_heads, max_seq_len, wave, heads)


def prefill_variant_code(name: str) -> int:
    """Kernel variant code for the prefill launcher from a KESTREL_PREFILL_KERNEL value."""
    if name not in _PREFILL_VARIANTS:
        raise ValueError(
            f"{PREFILL_KERNEL_ENV}={name!r} is not one of {', '.join(_PREFILL_VARIANTS)}"
        )
    return _PREFILL_VARIANTS[name]


def _layout_supported(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> bool:
    head_dim = q.shape[2]
    return (
        head_dim in SUPPORTED_HEAD_DIMS
        and key_cache.dtype in (q.dtype, FP8_KV_DTYPE)
        and value_cache.dtype == key_cache.dtype
        and key_cache.is_contiguous()
        and value_cache.is_contiguous()
        and q.stride(2) == 1
        and (q.shape[1] == 1 or q.stride(1) == head_dim)
        and q.stride(0) % 8 == 0
        and _dispatch.aligned16(q, key_cache, value_cache)
    )


def _metadata_supported(metadata: AttentionMetadata) -> bool:
    bt = metadata.block_tables
    return (
        bt.dtype == torch.int32
        and (bt.shape[1] <= 1 or bt.stride(1) == 1)
        and metadata.seq_lens.dtype == torch.int32
        and metadata.seq_lens.is_contiguous()
        and metadata.query_start_loc.dtype == torch.int32
        and metadata.query_start_loc.is_contiguous()
    )


def paged_attention_cuda(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    plan: AttentionPlan,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The kernel path of :func:`kestrel.ops.paged_attention`, launched as `plan` says; None
    when the inputs need the reference (dtype, head dim or layout the kernels do not handle, or
    a scale <= 0). Inputs are validated by the caller; k_scale and v_scale (checked > 0 there)
    apply to FP8 caches."""
    code = _dispatch.dtype_code(q.dtype)
    if code is None or not scale > 0 or not _layout_supported(q, key_cache, value_cache):
        return None
    _dispatch.require_same_device(
        "paged_attention",
        q=q,
        key_cache=key_cache,
        value_cache=value_cache,
        block_tables=metadata.block_tables,
        seq_lens=metadata.seq_lens,
        query_start_loc=metadata.query_start_loc,
    )
    if not _metadata_supported(metadata):
        return None
    fp8 = is_fp8(key_cache.dtype)
    if fp8 and not _dispatch.kernel_verified(_dispatch.FP8_KV_OP):
        return None  # see _dispatch.UNVERIFIED_OPS
    kv_code = _dispatch.FP8_CODE if fp8 else code
    scales = {"kv_dtype": kv_code, "k_scale": float(k_scale), "v_scale": float(v_scale)}
    num_tokens, num_decodes = metadata.num_tokens, metadata.num_decodes
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, block_size = key_cache.shape[2], key_cache.shape[1]
    if out is None:  # [T_padded, Hq, D] contiguous
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[0] > num_tokens:
        out[num_tokens:].zero_()
    kernels = _dispatch.kernels
    assert kernels is not None
    bt, seq_lens, qsl = metadata.block_tables, metadata.seq_lens, metadata.query_start_loc
    stream = _dispatch.stream_handle(q.device)
    with _dispatch.on_device(q.device):
        if num_decodes > 0:
            splits, ws = plan.decode_splits, plan.workspace
            if splits > 1 and ws is None:
                raise ValueError("the attention plan has decode splits but no workspace")
            args = _dispatch.kernel_args(
                kernels.DecodeAttentionArgs,
                out=out.data_ptr(),
                out_stride=out.stride(0),
                q=q.data_ptr(),
                q_stride=q.stride(0),
                key_cache=key_cache.data_ptr(),
                value_cache=value_cache.data_ptr(),
                block_tables=bt.data_ptr(),
                bt_stride=bt.stride(0),
                seq_lens=seq_lens.data_ptr(),
                num_seqs=num_decodes,
                num_q_heads=num_q_heads,
                num_kv_heads=num_kv_heads,
                head_dim=head_dim,
                block_size=block_size,
                scale=float(scale),
                heads_per_block=heads_per_block(num_q_heads // num_kv_heads, head_dim),
                num_splits=splits,
                min_split_len=plan.decode_min_split_len,
                workspace=0 if ws is None else ws.data_ptr(),
                workspace_floats=0 if ws is None else ws.numel(),
                dtype=code,
                **scales,
            )
            status = kernels.paged_decode_attention(args, stream)
            _dispatch.check("paged_attention (decode)", status)
        num_prefills = metadata.num_seqs - num_decodes
        num_prefill_tokens = num_tokens - num_decodes
        if num_prefills > 0 and num_prefill_tokens > 0:
            args = _dispatch.kernel_args(
                kernels.PrefillAttentionArgs,
                out=out[num_decodes:].data_ptr(),
                out_stride=out.stride(0),
                q=q[num_decodes:].data_ptr(),
                q_stride=q.stride(0),
                key_cache=key_cache.data_ptr(),
                value_cache=value_cache.data_ptr(),
                block_tables=bt[num_decodes:].data_ptr(),
                bt_stride=bt.stride(0),
                query_start_loc=qsl[num_decodes:].data_ptr(),
                seq_lens=seq_lens[num_decodes:].data_ptr(),
                num_seqs=num_prefills,
                num_tokens=num_prefill_tokens,
                num_q_heads=num_q_heads,
                num_kv_heads=num_kv_heads,
                head_dim=head_dim,
                block_size=block_size,
                scale=float(scale),
                variant=1 if fp8 and not FP8_PREFILL_WGMMA else plan.prefill_variant,
                dtype=code,
                **scales,
            )
            status = kernels.paged_prefill_attention(args, stream)
            _dispatch.check("paged_attention (prefill)", status)
    return out
