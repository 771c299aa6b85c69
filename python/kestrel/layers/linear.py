"""Linear projections whose parameters know how to load checkpoint tensors.

Every parameter carries a `weight_loader(param, loaded, shard_id)` attribute; a parameter made
of several checkpoint tensors (fused q/k/v, fused gate/up) also carries `shard_ids`, the names
of the shards that must all be loaded before the parameter is complete.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def new_parameter(
    shape: Sequence[int], dtype: torch.dtype, device: torch.device | str | None
) -> nn.Parameter:
    """Uninitialized inference-only parameter (filled by a loader or dummy init)."""
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


def default_weight_loader(
    param: torch.Tensor, loaded: torch.Tensor, shard_id: str | None = None
) -> None:
    """Copy a whole checkpoint tensor into `param`, converting dtype and device."""
    if shard_id is not None:
        raise ValueError(f"this parameter has no shards; got shard_id={shard_id!r}")
    if tuple(loaded.shape) != tuple(param.shape):
        raise ValueError(
            f"shape mismatch: checkpoint tensor {tuple(loaded.shape)}, "
            f"parameter {tuple(param.shape)}"
        )
    param.data.copy_(loaded)


class Linear(nn.Module):
    """y = x @ weight^T + bias; weight [out_features, in_features], bias [out_features]."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = new_parameter((out_features, in_features), dtype, device)
        self.weight.weight_loader = default_weight_loader
        if bias:
            self.bias: nn.Parameter | None = new_parameter((out_features,), dtype, device)
            self.bias.weight_loader = default_weight_loader
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [num_tokens, in_features] -> [num_tokens, out_features]
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several projections of the same input fused into one matmul.

    Output columns are the shards concatenated in the order given: for shard_sizes
    {"q": Q, "k": K, "v": V} the output is [num_tokens, Q + K + V] with q in [0, Q), etc.
    Each checkpoint tensor is copied into its row range of weight (and bias) at load time.
    """

    def __init__(
        self,
        in_features: int,
        shard_sizes: dict[str, int],
        bias: bool,
        dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        super().__init__(in_features, sum(shard_sizes.values()), bias, dtype, device)
        # shard name -> (first output row, number of rows)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, size in shard_sizes.items():
            self.shard_offsets[name] = (offset, size)
            offset += size
        for param in (self.weight, self.bias):
            if param is not None:
                param.weight_loader = self._load_shard
                param.shard_ids = tuple(shard_sizes)

    @property
    def output_sizes(self) -> list[int]:
        return [size for _, size in self.shard_offsets.values()]

    def _load_shard(
        self, param: torch.Tensor, loaded: torch.Tensor, shard_id: str | None = None
    ) -> None:
        if shard_id not in self.shard_offsets:
            raise ValueError(
                f"unknown shard {shard_id!r}; expected one of {list(self.shard_offsets)}"
            )
        offset, size = self.shard_offsets[shard_id]
        target = param.data.narrow(0, offset, size)
        if tuple(loaded.shape) != tuple(target.shape):
            raise ValueError(
                f"shape mismatch for shard {shard_id!r}: checkpoint tensor "
                f"{tuple(loaded.shape)}, expected {tuple(target.shape)}"
            )
        target.copy_(loaded)
