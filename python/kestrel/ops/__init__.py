"""Model ops: each runs its CUDA kernel (kestrel._kernels) on GPU tensors when built, else its
torch reference (``*_reference``), which runs anywhere and is the oracle for the kernel."""

from kestrel.ops._dispatch import KernelError, kernels_available
from kestrel.ops.activation import silu_and_mul, silu_and_mul_reference
from kestrel.ops.attention import (
    AttentionMetadata,
    paged_attention,
    paged_decode_attention,
    paged_prefill_attention,
)
from kestrel.ops.bitmask import apply_token_bitmask, apply_token_bitmask_reference
from kestrel.ops.norm import (
    fused_add_rms_norm,
    fused_add_rms_norm_reference,
    rms_norm,
    rms_norm_reference,
)
from kestrel.ops.rotary import (
    apply_rotary,
    compute_cos_sin_cache,
    rotary_embedding_and_cache,
    rotary_embedding_and_cache_reference,
    write_kv_cache,
)

__all__ = [
    "AttentionMetadata",
    "KernelError",
    "apply_rotary",
    "apply_token_bitmask",
    "apply_token_bitmask_reference",
    "compute_cos_sin_cache",
    "fused_add_rms_norm",
    "fused_add_rms_norm_reference",
    "kernels_available",
    "paged_attention",
    "paged_decode_attention",
    "paged_prefill_attention",
    "rms_norm",
    "rms_norm_reference",
    "rotary_embedding_and_cache",
    "rotary_embedding_and_cache_reference",
    "silu_and_mul",
    "silu_and_mul_reference",
    "write_kv_cache",
]
