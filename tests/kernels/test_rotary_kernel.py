"""Fused RoPE + paged KV write kernel against the torch reference run in fp32."""

import pytest
import torch

from kestrel.ops import (
    compute_cos_sin_cache,
    rotary_embedding_and_cache,
    rotary_embedding_and_cache_reference,
)
from tests.kernels.helpers import DTYPES, assert_close, randn

pytestmark = pytest.mark.cuda

LLAMA31 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 256, 40])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(8, 8), (12, 4), (32, 8), (28, 4)])
@pytest.mark.parametrize("tokens", [1, 37])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_rotary_and_cache(
    dtype, head_dim, num_q_heads, num_kv_heads, tokens, index_dtype, gen, spy
):
    max_position, block_size, num_blocks = 131072, 16, 9
    cos_sin = compute_cos_sin_cache(head_dim, max_position, 500000.0, LLAMA31, device="cuda")
    # q, k, v as views into one fused projection output, like the model's qkv split.
    width = (num_q_heads + 2 * num_kv_heads) * head_dim
    qkv = randn(tokens, width, dtype=dtype, gen=gen)
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :q_size].view(tokens, num_q_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(tokens, num_kv_heads, head_dim)
    v = qkv[:, q_size + kv_size :].view(tokens, num_kv_heads, head_dim)
    positions = torch.randint(
        0, max_position, (tokens,), generator=gen, device="cuda", dtype=torch.int64
    )
    # Distinct slots, every third token from the second on skipped (-1).
    slots = torch.randperm(num_blocks * block_size, generator=gen, device="cuda")[:tokens]
    slots[1::3] = -1
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.full(cache_shape, float("nan"), dtype=dtype, device="cuda")
    value_cache = torch.full(cache_shape, float("nan"), dtype=dtype, device="cuda")
    ref_q, ref_k, ref_v = q.float(), k.float(), v.float().clone()
    ref_kc = torch.full(cache_shape, float("nan"), device="cuda")
    ref_vc = torch.full(cache_shape, float("nan"), device="cuda")
    rotary_embedding_and_cache_reference(
        positions, ref_q, ref_k, ref_v, cos_sin, ref_kc, ref_vc, slots
    )
    rotary_embedding_and_cache(
        positions.to(index_dtype),
        q,
        k,
        v,
        cos_sin,
        key_cache,
        value_cache,
        slots.to(index_dtype),
    )
    assert spy.calls["rotary_embedding_and_cache"] == 1
    assert_close(q, ref_q, dtype, "rotated q")
    assert_close(k, ref_k, dtype, "rotated k")
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool, device="cuda")
    written[slots[slots >= 0]] = True
    kc, vc = (
        key_cache.view(-1, num_kv_heads, head_dim),
        value_cache.view(-1, num_kv_heads, head_dim),
    )
    assert bool(kc[~written].isnan().all()) and bool(vc[~written].isnan().all())
    assert torch.equal(kc[written], k[slots >= 0][_order(slots)])
    assert torch.equal(vc[written], v[slots >= 0][_order(slots)])
    ref_kc = ref_kc.view(-1, num_kv_heads, head_dim)
    assert_close(kc[written], ref_kc[written], dtype, "cached k")


def _order(slots: torch.Tensor) -> torch.Tensor:
    """Permutation from token order (kept slots) to ascending-slot order (boolean indexing)."""
    return torch.argsort(slots[slots >= 0])
