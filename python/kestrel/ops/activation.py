"""Gated activation reference ops."""

from __future__ import annotations

import torch


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU gate: ``silu(gate) * up`` where ``x = cat([gate, up], dim=-1)``.

    Args:
        x: [num_tokens, 2 * intermediate], float dtype; the first half of the last dimension is the
            gate projection, the second half the up projection.

    Returns:
        A new tensor [num_tokens, intermediate] in ``x.dtype``. The math runs in fp32 and is
        rounded once at the end. ``x`` is not modified.
    """
    if x.dim() < 1 or x.shape[-1] % 2 != 0:
        raise ValueError(
            f"silu_and_mul expects x [..., 2 * intermediate] with an even last dim; "
            f"got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"silu_and_mul expects a floating-point x; got dtype {x.dtype}")
    half = x.shape[-1] // 2
    gate = x[..., :half].float()
    up = x[..., half:].float()
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)
