"""FP8 (e4m3) KV caches on the GPU: the fused rotary + KV-write kernel writes the codes the
torch reference writes, and the decode and prefill attention kernels over FP8 caches match
an fp32 oracle on the K/V rounded through e4m3 (and, loosely, on the unrounded K/V).

Caches are poisoned: rows outside every context hold the e4m3 NaN code, padded block-table
entries are -1 or 2^30, outputs and workspaces start as NaN; blocks are shuffled."""

from __future__ import annotations

import pytest
import torch

from kestrel.ops import (
    _dispatch,
    attention_cuda,
    compute_cos_sin_cache,
    paged_attention,
    rotary_embedding_and_cache,
    rotary_embedding_and_cache_reference,
)
from kestrel.ops.kv_quant import FP8_KV_DTYPE, dequantize_kv, quantize_kv
from tests.kernels.helpers import (
    DTYPES,
    assert_close,
    dense_attention,
    make_paged_batch,
    randn,
    rel_err,
    set_kernel_env,
)

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def _run_unverified(monkeypatch):
    """The FP8 KV-cache kernels are in _dispatch.UNVERIFIED_OPS until these tests pass."""
    set_kernel_env(monkeypatch, _dispatch.UNVERIFIED_ENV, "1")


HEAD_DIMS = [64, 128, 256]
GQA = [(8, 8), (12, 4), (16, 4), (28, 4), (32, 2)]  # groups 1, 3, 4, 7, 16
SCALES = [(1.0, 1.0), (0.02, 0.01)]  # (k_scale, v_scale); V x 0.5 below
MIXED = [(1, 1), (1, 17), (1, 300), (1, 4100), (37, 37), (1, 1), (65, 130), (129, 1000), (3, 5)]


def _fp8_batch(lens, num_decodes, hq, hkv, d, dtype, gen, k_scale, v_scale, block_size=16):
    """A paged batch with FP8 caches (K, and V x 0.5, of the random batch, poison NaN codes
    kept) and its ground truth unrounded and rounded through e4m3."""
    batch = make_paged_batch(lens, num_decodes, hq, hkv, d, dtype, gen, block_size=block_size)
    batch.key_cache = quantize_kv(batch.key_cache.float(), k_scale)
    batch.value_cache = quantize_kv(batch.value_cache.float() * 0.5, v_scale)
    exact = [k.float() for k in batch.keys], [v.float() * 0.5 for v in batch.values]
    rounded = (
        [dequantize_kv(quantize_kv(k, k_scale), k_scale) for k in exact[0]],
        [dequantize_kv(quantize_kv(v, v_scale), v_scale) for v in exact[1]],
    )
    return batch, exact, rounded


def _oracle(batch, keys, values, scale):
    saved = batch.keys, batch.values
    batch.keys, batch.values = keys, values
    try:
        return dense_attention(batch, scale)
    finally:
        batch.keys, batch.values = saved


def _check(batch, exact, rounded, k_scale, v_scale, dtype, spy, decodes, prefills, what):
    d = batch.q.shape[2]
    scale = d**-0.5
    out = paged_attention(
        batch.q, batch.key_cache, batch.value_cache, batch.metadata, scale, k_scale, v_scale
    )
    assert spy.calls["paged_decode_attention"] == int(decodes), what
    assert spy.calls["paged_prefill_attention"] == int(prefills), what
    n = batch.metadata.num_tokens
    assert out.dtype == dtype
    assert_close(out[:n], _oracle(batch, *rounded, scale), dtype, what)
    loose = rel_err(out[:n], _oracle(batch, *exact, scale))
    # e4m3's own cost on these K/V: at most 0.041 in fp32 on the CPU over the shapes here.
    assert loose < 0.06, f"{what}: relative error {loose:.3g} against the unrounded K/V"


@pytest.fixture(params=["tc", "cuda_cores"])
def decode_kernel(request, monkeypatch) -> str:
    """Runs a test with the tensor-core decode for every GQA group >= 2 (head_dim 64 / 128)
    and with none."""
    monkeypatch.setattr(attention_cuda, "TC_MIN_GROUP", 2 if request.param == "tc" else 1000)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("num_q_heads,num_kv_heads", GQA)
@pytest.mark.parametrize("k_scale,v_scale", SCALES)
def test_decode_over_fp8(
    dtype, head_dim, num_q_heads, num_kv_heads, k_scale, v_scale, decode_kernel, gen, spy, poison
):
    """Long and short contexts (several splits, some empty) and single-split batches, on
    either decode kernel."""
    for lens in ([(1, s) for s in (1, 15, 16, 17, 257, 1000, 4096)], [(1, 33), (1, 7)] * 20):
        batch, exact, rounded = _fp8_batch(
            lens, len(lens), num_q_heads, num_kv_heads, head_dim, dtype, gen, k_scale, v_scale
        )
        spy.calls.clear()
        what = f"decode {len(lens)} seqs D={head_dim} Hq={num_q_heads} Hkv={num_kv_heads}"
        _check(batch, exact, rounded, k_scale, v_scale, dtype, spy, True, False, what)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("num_q_heads,num_kv_heads", GQA[:4])
@pytest.mark.parametrize("k_scale,v_scale", SCALES)
@pytest.mark.parametrize("variant", ["auto", "mma", "wgmma"])
def test_mixed_batch_over_fp8(
    dtype, head_dim, num_q_heads, num_kv_heads, k_scale, v_scale, variant, gen, spy, poison,
    monkeypatch,
):  # fmt: skip
    """Decodes and prefill chunks (odd lengths, cached prefixes) in one call, on each prefill
    kernel (wgmma: sm_90 and head_dim 64 / 128 only)."""
    if variant == "wgmma" and (head_dim == 256 or torch.cuda.get_device_capability() != (9, 0)):
        pytest.skip("the wgmma prefill runs on sm_90 for head_dim 64 and 128")
    set_kernel_env(monkeypatch, _dispatch.PREFILL_KERNEL_ENV, variant)
    batch, exact, rounded = _fp8_batch(
        MIXED, 4, num_q_heads, num_kv_heads, head_dim, dtype, gen, k_scale, v_scale, block_size=16
    )
    what = f"mixed D={head_dim} Hq={num_q_heads} Hkv={num_kv_heads} {variant}"
    _check(batch, exact, rounded, k_scale, v_scale, dtype, spy, True, True, what)


@pytest.mark.parametrize("block_size", [1, 8, 32])
def test_prefill_over_fp8_odd_block_sizes(block_size, gen, spy, poison):
    lens = [(45, 45), (7, 70), (130, 131), (1, 9)]
    batch, exact, rounded = _fp8_batch(
        lens, 0, 16, 4, 128, torch.bfloat16, gen, 0.02, 0.01, block_size=block_size
    )
    _check(batch, exact, rounded, 0.02, 0.01, torch.bfloat16, spy, False, True, f"bs={block_size}")


def test_fp8_decode_launcher_checks_its_scales(gen):
    """Scales must be > 0 for an FP8 cache (the op checks them first; so does the launcher)."""
    batch, _, _ = _fp8_batch([(1, 40)], 1, 16, 1, 128, torch.bfloat16, gen, 1.0, 1.0)
    kernels = _dispatch.kernels
    out = torch.zeros_like(batch.q)
    stream = _dispatch.stream_handle(out.device)
    meta = batch.metadata
    for heads in (8, 16):  # CUDA cores, tensor cores
        args = _dispatch.kernel_args(
            kernels.DecodeAttentionArgs, out=out.data_ptr(), out_stride=out.stride(0),
            q=batch.q.data_ptr(), q_stride=batch.q.stride(0),
            key_cache=batch.key_cache.data_ptr(), value_cache=batch.value_cache.data_ptr(),
            block_tables=meta.block_tables.data_ptr(), bt_stride=meta.block_tables.stride(0),
            seq_lens=meta.seq_lens.data_ptr(), num_seqs=1, num_q_heads=16, num_kv_heads=1,
            head_dim=128, block_size=16, scale=0.1, heads_per_block=heads, num_splits=1,
            min_split_len=64, dtype=1, kv_dtype=_dispatch.FP8_CODE,
        )  # fmt: skip
        assert kernels.paged_decode_attention(args, stream) == 0
        args.v_scale = 0.0
        assert kernels.paged_decode_attention(args, stream) != 0
        args.v_scale, args.kv_dtype = 1.0, 7  # no such cache dtype
        assert kernels.paged_decode_attention(args, stream) != 0
    torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 256, 40])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(8, 8), (28, 4)])
@pytest.mark.parametrize("k_scale,v_scale", [(1.0, 1.0), (0.05, 0.002), (8.0, 3.0)])
def test_rotary_writes_fp8_codes(
    dtype, head_dim, num_q_heads, num_kv_heads, k_scale, v_scale, gen, spy
):
    """The kernel's codes are the reference's (run in the same dtype on the GPU): V exactly,
    K up to a rounding of the rotation (one e4m3 step, rarely); large values saturate."""
    tokens, block_size, num_blocks = 37, 16, 5
    cos_sin = compute_cos_sin_cache(head_dim, 4096, 10000.0, None, device="cuda")
    width = (num_q_heads + 2 * num_kv_heads) * head_dim
    qkv = randn(tokens, width, dtype=dtype, gen=gen) * 3
    qkv[0, :] = 1e4  # saturates under every scale
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :q_size].view(tokens, num_q_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(tokens, num_kv_heads, head_dim)
    v = qkv[:, q_size + kv_size :].view(tokens, num_kv_heads, head_dim)
    positions = torch.randint(0, 4096, (tokens,), generator=gen, device="cuda")
    slots = torch.randperm(num_blocks * block_size, generator=gen, device="cuda")[:tokens]
    slots[1::3] = -1
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    nan = torch.full(shape, float("nan"), device="cuda")
    key_cache, value_cache = quantize_kv(nan, 1.0), quantize_kv(nan, 1.0)
    ref_kc, ref_vc = key_cache.clone(), value_cache.clone()
    ref_q, ref_k, ref_v = q.clone(), k.clone(), v.clone()
    rotary_embedding_and_cache_reference(
        positions, ref_q, ref_k, ref_v, cos_sin, ref_kc, ref_vc, slots, k_scale, v_scale
    )
    rotary_embedding_and_cache(
        positions, q, k, v, cos_sin, key_cache, value_cache, slots, k_scale, v_scale
    )
    assert spy.calls["rotary_embedding_and_cache"] == 1
    assert key_cache.dtype == FP8_KV_DTYPE
    assert_close(q, ref_q.float(), dtype, "rotated q")
    assert torch.equal(value_cache.view(torch.uint8), ref_vc.view(torch.uint8)), "V codes"
    written = slots[slots >= 0]
    got = key_cache.view(-1, num_kv_heads, head_dim)[written].float() * k_scale
    want = ref_kc.view(-1, num_kv_heads, head_dim)[written].float() * k_scale
    codes = key_cache.view(-1, num_kv_heads, head_dim)[written].float()
    assert bool(torch.isfinite(codes).all()) and float(codes.abs().max()) == 448.0  # saturated
    differ = got != want
    assert float(differ.float().mean()) < 0.01, "K codes differ too often"
    step = torch.maximum(want.abs() / 8, torch.full_like(want, 2.0**-9 * k_scale))
    assert bool(((got - want).abs() <= step * 1.001).all()), "K codes differ by more than a step"
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device="cuda")
    untouched[written] = False
    rows = key_cache.view(-1, num_kv_heads, head_dim)[untouched]
    assert bool(torch.isnan(rows.float()).all()), "rows of skipped slots were written"
