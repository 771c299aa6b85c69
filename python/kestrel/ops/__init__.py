"""Torch-native reference ops: the portable implementation and the oracle for the CUDA kernels."""

from kestrel.ops.activation import silu_and_mul
from kestrel.ops.attention import (
    AttentionMetadata,
    paged_attention,
    paged_decode_attention,
    paged_prefill_attention,
)
from kestrel.ops.norm import fused_add_rms_norm, rms_norm
from kestrel.ops.rotary import (
    apply_rotary,
    compute_cos_sin_cache,
    rotary_embedding_and_cache,
    write_kv_cache,
)

__all__ = [
    "AttentionMetadata",
    "apply_rotary",
    "compute_cos_sin_cache",
    "fused_add_rms_norm",
    "paged_attention",
    "paged_decode_attention",
    "paged_prefill_attention",
    "rms_norm",
    "rotary_embedding_and_cache",
    "silu_and_mul",
    "write_kv_cache",
]
