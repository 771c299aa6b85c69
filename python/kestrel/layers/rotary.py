"""Holder of the rotary cos/sin table shared by every attention layer of a model."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kestrel import ops


class RotaryEmbedding(nn.Module):
    """Owns `cos_sin_cache` [max_position, head_dim] fp32: cos in the first half of each row,
    sin in the second (see `kestrel.ops.compute_cos_sin_cache`).

    The table stays fp32 whatever the model dtype (the rotation math runs in fp32); it is a
    non-persistent buffer, so it is never expected in, or written to, a checkpoint.
    """

    def __init__(
        self,
        head_dim: int,
        max_position: int,
        rope_theta: float,
        rope_scaling: dict[str, Any] | None,
        device: torch.device | str | None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_position = max_position
        cache = ops.compute_cos_sin_cache(
            head_dim, max_position, rope_theta, rope_scaling, dtype=torch.float32, device=device
        )
        self.register_buffer("cos_sin_cache", cache, persistent=False)
