"""FP8 (e4m3) KV caches on the torch reference path (CPU): the setting, the quantization
(scale, saturation), the KV write and paged attention over FP8 blocks.

Attention over an FP8 cache is checked twice: tightly against fp64 attention on the K/V rounded
through e4m3 (so only the dequantization and its scale can be wrong), and loosely against
attention on the unrounded K/V (the precision e4m3 costs)."""

from __future__ import annotations

import pytest
import torch

from kestrel.config import ConfigError, EngineConfig
from kestrel.ops import paged_attention, rotary_embedding_and_cache_reference, write_kv_cache
from kestrel.ops.kv_quant import (
    FP8_KV_DTYPE,
    FP8_MAX,
    dequantize_kv,
    quantize_kv,
    require_fp8_kv_device,
    resolve_kv_cache_dtype,
)
from kestrel.ops.rotary import compute_cos_sin_cache
from kestrel.runner.model_runner import kv_block_bytes
from tests.ops.test_ref_attention import MIXED, NUM_DECODES, _dense_causal_attention, _make_batch

# ---- the setting -----------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["fp16", "float8", "fp8_e5m2", "FP8", ""])
def test_bad_kv_cache_dtype_names_the_allowed_values(value):
    with pytest.raises(ConfigError) as info:
        EngineConfig(kv_cache_dtype=value)
    assert info.value.field == "kv_cache_dtype"
    assert repr(value) in str(info.value) and "auto, fp8, fp8_e4m3" in str(info.value)


def test_kv_cache_dtype_names():
    assert EngineConfig().kv_cache_dtype == "auto"
    assert resolve_kv_cache_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert resolve_kv_cache_dtype("fp8", torch.bfloat16) == FP8_KV_DTYPE
    assert resolve_kv_cache_dtype("fp8_e4m3", torch.float16) == FP8_KV_DTYPE
    with pytest.raises(ConfigError, match="allowed: auto, fp8, fp8_e4m3"):
        resolve_kv_cache_dtype("int8", torch.float16)


def test_fp8_kv_needs_capability_8_9(monkeypatch):
    require_fp8_kv_device(torch.device("cpu"))  # the reference runs anywhere
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ConfigError) as info:
        require_fp8_kv_device(torch.device("cuda", 0))
    assert info.value.field == "kv_cache_dtype"
    assert "8.9" in str(info.value) and "A100" in str(info.value) and "8.0" in str(info.value)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    require_fp8_kv_device(torch.device("cuda", 0))


def test_fp8_block_is_half_a_bf16_block():
    from kestrel.model_config import ModelConfig

    config = ModelConfig.__new__(ModelConfig)
    object.__setattr__(config, "num_key_value_heads", 2)
    object.__setattr__(config, "head_dim", 64)
    object.__setattr__(config, "num_hidden_layers", 3)
    bf16 = kv_block_bytes(config, 16, torch.bfloat16)
    assert bf16 == 2 * 16 * 2 * 64 * 2 * 3
    assert kv_block_bytes(config, 16, FP8_KV_DTYPE) * 2 == bf16


# ---- quantization ----------------------------------------------------------------------------


def test_quantize_saturates_and_never_makes_nan():
    x = torch.tensor([0.0, 1.0, -1.0, 447.0, 460.0, 1e4, -1e30, float("inf"), float("-inf")])
    got = dequantize_kv(quantize_kv(x, 1.0), 1.0)
    want = torch.tensor([0.0, 1.0, -1.0, 448.0, 448.0, 448.0, -448.0, 448.0, -448.0])
    assert torch.equal(got, want)
    # A small scale brings large values into range; beyond 448 * scale they saturate.
    y = torch.tensor([3.0, -40.0, 1e6])  # codes 24, -320, 448
    assert torch.equal(
        dequantize_kv(quantize_kv(y, 0.125), 0.125), torch.tensor([3.0, -40.0, 56.0])
    )


def test_quantize_rounds_to_nearest_e4m3():
    z = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    for scale in (1.0, 0.07, 3.5):
        x = z * 60 * scale  # within +-448 * scale (no saturation), subnormals included
        codes = quantize_kv(x, scale)
        assert codes.dtype == FP8_KV_DTYPE
        back = dequantize_kv(codes, scale)
        # e4m3 keeps 3 mantissa bits: half an ulp is at most 1/16 of the value (normal range),
        # and at most 2^-10 * scale below 2^-6 (subnormals).
        err = (back - x).abs()
        bound = torch.maximum(x.abs() / 16, torch.full_like(x, 2.0**-10 * scale)) * (1 + 1e-6)
        assert bool((err <= bound).all()), float((err - bound).max())
        # Every value e4m3 represents survives exactly.
        assert torch.equal(dequantize_kv(quantize_kv(back, scale), scale), back)


def test_bf16_rows_keep_their_rounding():
    """The cache encodes the bf16 value the K/V tensor holds (as the kernels do)."""
    x = torch.randn(64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    assert torch.equal(quantize_kv(x, 0.5), quantize_kv(x.float(), 0.5))


# ---- the write -------------------------------------------------------------------------------


def test_write_kv_cache_fp8_with_scales():
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(5, 2, 16, generator=gen) * 20
    v = torch.randn(5, 2, 16, generator=gen) * 0.01
    key_cache = torch.zeros(4, 4, 2, 16, dtype=FP8_KV_DTYPE)
    value_cache = torch.zeros_like(key_cache)
    slots = torch.tensor([3, 0, -1, 13, 7])
    write_kv_cache(k, v, key_cache, value_cache, slots, k_scale=0.1, v_scale=2e-4)
    rows_k = key_cache.view(-1, 2, 16)
    rows_v = value_cache.view(-1, 2, 16)
    for i, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        assert torch.equal(rows_k[slot].view(torch.uint8), quantize_kv(k[i], 0.1).view(torch.uint8))
        assert torch.equal(
            rows_v[slot].view(torch.uint8), quantize_kv(v[i], 2e-4).view(torch.uint8)
        )
    written = {3, 0, 13, 7}
    untouched = [s for s in range(16) if s not in written]
    assert bool((rows_k[untouched].float() == 0).all())


def test_rotary_and_cache_reference_writes_rotated_k_codes():
    gen = torch.Generator().manual_seed(4)
    positions = torch.tensor([0, 5, 9])
    q = torch.randn(3, 4, 32, generator=gen)
    k = torch.randn(3, 2, 32, generator=gen) * 5
    v = torch.randn(3, 2, 32, generator=gen)
    cos_sin = compute_cos_sin_cache(32, 16, 10000.0, None)
    key_cache = torch.zeros(2, 8, 2, 32, dtype=FP8_KV_DTYPE)
    value_cache = torch.zeros_like(key_cache)
    slots = torch.tensor([1, 9, 14])
    k_rotated = k.clone()
    rotary_embedding_and_cache_reference(
        positions, q, k_rotated, v, cos_sin, key_cache, value_cache, slots, 0.05, 0.5
    )
    assert not torch.equal(k_rotated, k)  # rotated in place
    rows = key_cache.view(-1, 2, 32)[slots]
    assert torch.equal(rows.view(torch.uint8), quantize_kv(k_rotated, 0.05).view(torch.uint8))
    v_rows = value_cache.view(-1, 2, 32)[slots]
    assert torch.equal(v_rows.view(torch.uint8), quantize_kv(v, 0.5).view(torch.uint8))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_scales_are_refused(bad):
    batch = _make_batch(MIXED, NUM_DECODES, 4, 4, 2, 16, torch.float32, seed=1)
    with pytest.raises(ValueError, match="k_scale"):
        paged_attention(batch.q, batch.key_cache, batch.value_cache, batch.metadata, 0.25, bad)


# ---- attention over FP8 blocks ---------------------------------------------------------------


def _fp8_batch(block_size, num_q_heads, num_kv_heads, head_dim, q_dtype, k_scale, v_scale, seed):
    """A mixed batch whose cache is FP8 (of its fp32 rows, K x 4 and V x 0.5), with the ground
    truth K/V and the same rounded through e4m3."""
    batch = _make_batch(
        MIXED, NUM_DECODES, block_size, num_q_heads, num_kv_heads, head_dim, torch.float32, seed
    )
    batch.key_cache = quantize_kv(batch.key_cache * 4, k_scale)
    batch.value_cache = quantize_kv(batch.value_cache * 0.5, v_scale)
    batch.keys = [k * 4 for k in batch.keys]
    batch.values = [v * 0.5 for v in batch.values]
    rounded = _make_batch(
        MIXED, NUM_DECODES, block_size, num_q_heads, num_kv_heads, head_dim, torch.float32, seed
    )
    rounded.keys = [dequantize_kv(quantize_kv(k, k_scale), k_scale) for k in batch.keys]
    rounded.values = [dequantize_kv(quantize_kv(v, v_scale), v_scale) for v in batch.values]
    batch.q = batch.q.to(q_dtype)
    rounded.q = batch.q
    return batch, rounded


@pytest.mark.parametrize("block_size", [16, 4])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("k_scale,v_scale", [(1.0, 1.0), (0.05, 0.01)])
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
def test_attention_over_fp8_cache(block_size, num_q_heads, num_kv_heads, k_scale, v_scale, q_dtype):
    batch, rounded = _fp8_batch(
        block_size, num_q_heads, num_kv_heads, 32, q_dtype, k_scale, v_scale, seed=block_size
    )
    scale = 32**-0.5
    got = paged_attention(
        batch.q, batch.key_cache, batch.value_cache, batch.metadata, scale, k_scale, v_scale
    )
    assert got.dtype == q_dtype and bool(torch.isfinite(got).all())
    tight = (
        {"atol": 1e-5, "rtol": 1e-5} if q_dtype == torch.float32 else {"atol": 4e-3, "rtol": 8e-3}
    )
    torch.testing.assert_close(got.double(), _dense_causal_attention(rounded, scale), **tight)
    exact = _dense_causal_attention(batch, scale)
    err = float((got.double() - exact).norm() / exact.norm())
    assert err < 0.06, f"relative error {err:.3g} against unrounded K/V"


def test_v_scale_scales_the_output_and_k_scale_the_scores():
    batch, _ = _fp8_batch(4, 8, 2, 32, torch.float32, 0.05, 0.01, seed=9)
    meta, kc, vc = batch.metadata, batch.key_cache, batch.value_cache
    base = paged_attention(batch.q, kc, vc, meta, 0.2, 0.05, 0.01)
    torch.testing.assert_close(paged_attention(batch.q, kc, vc, meta, 0.2, 0.05, 0.03), 3 * base)
    # k_scale multiplies every score: the same as a softmax scale that much larger.
    torch.testing.assert_close(
        paged_attention(batch.q, kc, vc, meta, 0.2, 0.1, 0.01),
        paged_attention(batch.q, kc, vc, meta, 0.4, 0.05, 0.01),
    )


def test_scales_are_ignored_by_a_16_bit_cache():
    batch = _make_batch(MIXED, NUM_DECODES, 4, 4, 2, 16, torch.float32, seed=2)
    args = (batch.q, batch.key_cache, batch.value_cache, batch.metadata, 0.25)
    torch.testing.assert_close(paged_attention(*args, 0.5, 7.0), paged_attention(*args))


def test_saturated_keys_give_finite_attention():
    batch, _ = _fp8_batch(4, 4, 2, 32, torch.float32, 1.0, 1.0, seed=11)
    huge_k = quantize_kv(torch.full(batch.key_cache.shape, 1e9), 1.0)
    assert bool((huge_k.float() == FP8_MAX).all())
    got = paged_attention(batch.q, huge_k, batch.value_cache, batch.metadata, 0.2)
    assert bool(torch.isfinite(got).all())
