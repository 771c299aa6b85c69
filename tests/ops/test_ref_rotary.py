"""Rotary cos/sin table, apply_rotary and the KV-cache write, against transformers' Llama code."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from kestrel.ops import (
    apply_rotary,
    compute_cos_sin_cache,
    rotary_embedding_and_cache,
    write_kv_cache,
)

LLAMA31 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# Small original context so that head_dim 32 has frequencies in all three llama3 bands.
LLAMA3_SMALL = {**LLAMA31, "original_max_position_embeddings": 64}


def _hf_rotary(head_dim: int, max_position: int, theta: float, rope_scaling: dict | None):
    params = dict(rope_scaling or {})
    params["rope_type"] = params.pop("type", params.get("rope_type", "default"))
    params["rope_theta"] = theta
    config = LlamaConfig(
        hidden_size=head_dim * 2,
        num_attention_heads=2,
        head_dim=head_dim,
        max_position_embeddings=max_position,
        rope_parameters=params,
    )
    return LlamaRotaryEmbedding(config)


def _hf_cos_sin(rotary: LlamaRotaryEmbedding, positions: torch.Tensor):
    x = torch.empty(1, dtype=torch.float32)
    cos, sin = rotary(x, positions.long()[None, :])
    return cos[0], sin[0]  # [num_tokens, head_dim] each, halves duplicated


@pytest.mark.parametrize(
    "head_dim,max_position,theta,rope_scaling",
    [
        (64, 300, 10000.0, None),
        (32, 257, 1e6, {"rope_type": "default"}),
        (64, 300, 10000.0, {"type": "linear", "factor": 4.0}),
        (32, 1000, 500000.0, LLAMA3_SMALL),
        (128, 16384, 500000.0, LLAMA31),
    ],
)
def test_cos_sin_cache_matches_transformers(head_dim, max_position, theta, rope_scaling):
    cache = compute_cos_sin_cache(head_dim, max_position, theta, rope_scaling)
    assert cache.shape == (max_position, head_dim) and cache.dtype == torch.float32
    rotary = _hf_rotary(head_dim, max_position, theta, rope_scaling)
    want_cos, want_sin = _hf_cos_sin(rotary, torch.arange(max_position))
    half = head_dim // 2
    # Same fp32 operations in the same order as transformers: bit-identical tables.
    assert torch.equal(cache[:, :half], want_cos[:, :half])
    assert torch.equal(cache[:, half:], want_sin[:, :half])
    assert torch.equal(want_cos[:, :half], want_cos[:, half:])  # HF duplicates the halves


def test_llama3_bands():
    """High frequencies untouched, low ones divided by factor, the middle band in between."""
    head_dim, positions = 32, 8
    default = compute_cos_sin_cache(head_dim, positions, 500000.0, None)
    scaled = compute_cos_sin_cache(head_dim, positions, 500000.0, {"type": "linear", "factor": 8})
    llama3 = compute_cos_sin_cache(head_dim, positions, 500000.0, LLAMA3_SMALL)
    half = head_dim // 2
    inv_default = torch.atan2(default[1, half:], default[1, :half])  # angle at position 1
    inv_llama3 = torch.atan2(llama3[1, half:], llama3[1, :half])
    wavelen = 2 * torch.pi / inv_default
    high, low = wavelen < 64 / 4, wavelen > 64 / 1
    middle = ~high & ~low
    assert high.any() and low.any() and middle.any()
    assert torch.equal(llama3[:, :half][:, high], default[:, :half][:, high])
    assert torch.equal(llama3[:, :half][:, low], scaled[:, :half][:, low])
    ratio = inv_llama3[middle] / inv_default[middle]
    assert bool(((ratio > 1 / 8) & (ratio < 1)).all())


def test_cos_sin_cache_dtype_and_errors():
    bf16 = compute_cos_sin_cache(16, 10, 10000.0, None, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    assert torch.equal(bf16, compute_cos_sin_cache(16, 10, 10000.0, None).bfloat16())
    with pytest.raises(ValueError, match=r"'yarn'.*default, linear, llama3"):
        compute_cos_sin_cache(16, 10, 10000.0, {"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="low_freq_factor"):
        compute_cos_sin_cache(16, 10, 10000.0, {"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ValueError, match="head_dim"):
        compute_cos_sin_cache(15, 10, 10000.0, None)
    with pytest.raises(ValueError, match="max_position"):
        compute_cos_sin_cache(16, 0, 10000.0, None)


@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("rope_scaling", [None, LLAMA3_SMALL])
def test_apply_rotary_matches_transformers(pos_dtype, rope_scaling):
    gen = torch.Generator().manual_seed(7)
    head_dim, max_position, num_tokens = 32, 500, 37
    cache = compute_cos_sin_cache(head_dim, max_position, 500000.0, rope_scaling)
    positions = torch.randperm(max_position, generator=gen)[:num_tokens].to(pos_dtype)
    q = torch.randn(num_tokens, 8, head_dim, generator=gen)
    k = torch.randn(num_tokens, 2, head_dim, generator=gen)
    cos, sin = _hf_cos_sin(_hf_rotary(head_dim, max_position, 500000.0, rope_scaling), positions)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
    assert apply_rotary(positions, q, k, cache) is None
    assert torch.equal(q, want_q) and torch.equal(k, want_k)


def test_apply_rotary_bf16_rounds_fp32_math():
    gen = torch.Generator().manual_seed(8)
    cache = compute_cos_sin_cache(64, 100, 10000.0, None)
    positions = torch.randint(0, 100, (19,), generator=gen)
    q = torch.randn(19, 4, 64, generator=gen).bfloat16()
    k = torch.randn(19, 4, 64, generator=gen).bfloat16()
    cos, sin = _hf_cos_sin(_hf_rotary(64, 100, 10000.0, None), positions)
    want_q, want_k = apply_rotary_pos_emb(q.float(), k.float(), cos, sin, unsqueeze_dim=1)
    apply_rotary(positions, q, k, cache)
    assert q.dtype == torch.bfloat16
    assert torch.equal(q, want_q.bfloat16()) and torch.equal(k, want_k.bfloat16())


def _random_cache(gen, num_blocks, block_size, num_kv_heads, head_dim, dtype):
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_write_kv_cache_skips_negative_slots(cache_dtype):
    gen = torch.Generator().manual_seed(9)
    num_blocks, block_size, heads, head_dim, num_tokens = 6, 4, 2, 16, 11
    key_cache, value_cache = _random_cache(
        gen, num_blocks, block_size, heads, head_dim, cache_dtype
    )
    key_before, value_before = key_cache.clone(), value_cache.clone()
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[[1, 4, 10]] = torch.tensor([-1, -1, -5])
    k = torch.randn(num_tokens, heads, head_dim, generator=gen)
    v = torch.randn(num_tokens, heads, head_dim, generator=gen)
    write_kv_cache(k, v, key_cache, value_cache, slots)
    want_key, want_value = key_before.clone(), value_before.clone()
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            want_key[slot // block_size, slot % block_size] = k[t].to(cache_dtype)
            want_value[slot // block_size, slot % block_size] = v[t].to(cache_dtype)
    assert torch.equal(key_cache, want_key) and torch.equal(value_cache, want_value)
    assert (key_cache != key_before).any(), "some rows must have been written"


def test_write_kv_cache_errors():
    key_cache = torch.randn(4, 4, 2, 8)
    k = torch.randn(3, 2, 8)
    with pytest.raises(ValueError, match="contiguous"):
        non_contiguous = torch.randn(4, 2, 4, 8).transpose(1, 2)
        write_kv_cache(k, k, non_contiguous, non_contiguous, torch.arange(3))
    with pytest.raises(ValueError, match="num_tokens=3"):
        write_kv_cache(torch.randn(3, 1, 8), k, key_cache, key_cache.clone(), torch.arange(3))


def test_rotary_embedding_and_cache_writes_rotated_k():
    gen = torch.Generator().manual_seed(10)
    num_tokens, heads, kv_heads, head_dim, block_size = 9, 4, 2, 32, 4
    cos_sin = compute_cos_sin_cache(head_dim, 64, 10000.0, None)
    positions = torch.randint(1, 64, (num_tokens,), generator=gen, dtype=torch.int32)
    q = torch.randn(num_tokens, heads, head_dim, generator=gen)
    k = torch.randn(num_tokens, kv_heads, head_dim, generator=gen)
    v = torch.randn(num_tokens, kv_heads, head_dim, generator=gen)
    key_cache, value_cache = _random_cache(gen, 5, block_size, kv_heads, head_dim, torch.float32)
    slots = torch.randperm(5 * block_size, generator=gen)[:num_tokens]
    slots[3] = -1
    value_cache_before = value_cache.clone()
    cos, sin = _hf_cos_sin(_hf_rotary(head_dim, 64, 10000.0, None), positions)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
    v_before = v.clone()
    rotary_embedding_and_cache(positions, q, k, v, cos_sin, key_cache, value_cache, slots)
    torch.testing.assert_close(q, want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, want_k, atol=1e-5, rtol=1e-5)
    assert torch.equal(v, v_before)
    flat_key = key_cache.view(-1, kv_heads, head_dim)
    flat_value = value_cache.view(-1, kv_heads, head_dim)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            torch.testing.assert_close(flat_key[slot], want_k[t], atol=1e-5, rtol=1e-5)
            assert torch.equal(flat_value[slot], v[t])
    # Token 3 (slot -1) landed nowhere; slots nobody wrote are unchanged.
    assert not any(torch.equal(flat_value[s], v[3]) for s in range(5 * block_size))
    untouched = torch.ones(5 * block_size, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    assert torch.equal(flat_value[untouched], value_cache_before.view_as(flat_value)[untouched])
