"""The tensor-parallel group a layer is sharded over.

Layers receive a `TensorParallelGroup` as an explicit constructor argument (there is no
module-level "current group"); `SINGLE_RANK`, the default, is the size-1 group, for which every
collective is a Python early return: the forward pass at size 1 runs exactly the tensor ops of an
unsharded model (no copies, no extra kernels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# torch >= 2.13 renames all_gather_into_tensor (output [size * d0, ...] = the ranks' inputs
# stacked along dim 0) to all_gather_single.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class TensorParallelGroup:
    """This process's place in a tensor-parallel group: `rank` in [0, `size`).

    `process_group` is the torch.distributed group the collectives run on (None: the default
    group); it is never touched at size 1, so a size-1 group needs no torch.distributed setup.
    """

    rank: int = 0
    size: int = 1
    process_group: Any = None  # torch.distributed.ProcessGroup | None

    def __post_init__(self) -> None:
        for name in ("rank", "size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"TensorParallelGroup.{name}={value!r} must be an int")
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(
                f"TensorParallelGroup needs size >= 1 and 0 <= rank < size; got rank={self.rank}, "
                f"size={self.size}"
            )

    @classmethod
    def from_process_group(cls, process_group: Any = None) -> TensorParallelGroup:
        """The group of an initialized torch.distributed process group (None: the default)."""
        return cls(
            rank=dist.get_rank(process_group),
            size=dist.get_world_size(process_group),
            process_group=process_group,
        )

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over the ranks, in place; returns `x` (untouched at size 1)."""
        if self.size == 1:
            return x
        dist.all_reduce(x, group=self.process_group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The ranks' `x` concatenated along `dim` in rank order: [..., size * x.shape[dim], ...].

        Every rank must pass the same shape. Returns `x` itself at size 1.
        """
        if self.size == 1:
            return x
        dim = dim % x.dim()
        x = x.contiguous()
        # Rank r's x lands in rows [r * x.shape[0], (r + 1) * x.shape[0]) of `flat`.
        flat = torch.empty((self.size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        _all_gather_single(flat, x, group=self.process_group)
        if dim == 0:
            return flat
        return torch.cat(flat.chunk(self.size, dim=0), dim=dim)


# The size-1 group: the default of every layer's `tp_group` argument (immutable).
SINGLE_RANK = TensorParallelGroup()


def divide(numerator: int, denominator: int, what: str) -> int:
    """numerator / denominator, which must be exact; `what` names the sharded size in errors."""
    if numerator % denominator != 0:
        raise ValueError(
            f"{what}={numerator} is not divisible by the tensor-parallel size {denominator}"
        )
    return numerator // denominator
