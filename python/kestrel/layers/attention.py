"""Paged attention layer: RoPE + KV-cache write for the whole batch, then attention."""

from __future__ import annotations

import torch
from torch import nn

from kestrel import ops
from kestrel.ops import _dispatch


class PagedAttention(nn.Module):
    """Attention core without projections (no parameters).

    The K/V of every token of the step is written into the cache BEFORE attention runs, so
    tokens scheduled in the same step (a prefill chunk) see each other's K/V.
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """dtype, device: of q/k/v and the cache; with both given the RoPE + KV-write op is
        chosen now (the fused kernel's dispatching op on CUDA fp16/bf16, else the reference);
        without, the dispatching op decides per call."""
        super().__init__()
        if num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}"
            )
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        # An FP8 KV cache's per-layer scales (stored = x / scale); a checkpoint's calibrated
        # ones are set by kestrel.layers.kv_scales at load. Ignored by 16-bit caches.
        self.k_scale = 1.0
        self.v_scale = 1.0
        reference = dtype is not None and not _dispatch.kernels_for(device, dtype)
        self._rotary_and_cache = (
            ops.rotary_embedding_and_cache_reference
            if reference
            else ops.rotary_embedding_and_cache
        )

    def forward(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        attn_metadata: ops.AttentionMetadata,
    ) -> torch.Tensor:
        """positions [T] int; q [T, num_heads, head_dim]; k, v [T, num_kv_heads, head_dim];
        kv_cache = (key_cache, value_cache), each [num_blocks, block_size, num_kv_heads,
        head_dim]. q and k are rotated in place. Returns [T, num_heads, head_dim]."""
        self.write_cache(positions, q, k, v, cos_sin_cache, kv_cache, attn_metadata.slot_mapping)
        return self.attend(q, kv_cache, attn_metadata)

    def write_cache(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        slot_mapping: torch.Tensor,
    ) -> None:
        """The first half: RoPE on q and k (in place) and k, v into the cache at
        `slot_mapping` (rows with a negative slot are not written). Shape-static: no step
        metadata beyond the slots, so it can sit inside a CUDA graph of fixed token count."""
        key_cache, value_cache = kv_cache
        self._rotary_and_cache(
            positions, q, k, v, cos_sin_cache, key_cache, value_cache, slot_mapping,
            self.k_scale, self.v_scale,
        )  # fmt: skip

    def attend(
        self,
        q: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        attn_metadata: ops.AttentionMetadata,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The second half: attention of (rotated) q over the cache; into `out` when given
        (q's shape; rows past the step's tokens zeroed)."""
        key_cache, value_cache = kv_cache
        return ops.paged_attention(
            q, key_cache, value_cache, attn_metadata, self.scale, self.k_scale, self.v_scale,
            out=out,
        )  # fmt: skip
