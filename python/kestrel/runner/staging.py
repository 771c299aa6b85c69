"""Host -> device staging of the scheduler's numpy arrays through pinned buffers.

On CUDA every array is copied into a slice of a persistent page-locked buffer and sent with a
non-blocking copy, so a step issues its uploads without waiting. There are two sets of buffers,
used by alternate steps: with overlap scheduling step N + 1 is staged while step N (whose copies
may not have run yet) is in flight, and a set is reused only by step N + 2, once the engine has
waited for step N's results (which come after its copies on the stream). On CPU the numpy
arrays are wrapped, not copied.
"""

from __future__ import annotations

import numpy as np
import torch

_CAPACITY_ELEMS = 1 << 20  # per dtype, grown on demand


class HostStager:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._sets: tuple[dict[torch.dtype, torch.Tensor], ...] = ({}, {})
        self._parity = 0
        self._pinned = self._sets[0]
        self._offsets: dict[torch.dtype, int] = {}

    def begin_step(self) -> None:
        """Start filling the other set of buffers from its beginning (its copies, made two
        steps ago, are done)."""
        self._parity ^= 1
        self._pinned = self._sets[self._parity]
        self._offsets = {}

    def to_device(self, array: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
        src = torch.from_numpy(array)
        if dtype is not None and src.dtype != dtype:
            src = src.to(dtype)
        if self.device.type == "cpu":
            return src
        flat = src.reshape(-1)
        buf = self._slot(src.dtype, flat.numel())
        buf.copy_(flat)
        return buf.to(self.device, non_blocking=True).view(src.shape)

    def _slot(self, dtype: torch.dtype, n: int) -> torch.Tensor:
        pinned = self._pinned.get(dtype)
        offset = self._offsets.get(dtype, 0)
        if pinned is None or offset + n > pinned.numel():
            # A new buffer: the old one may still be read by in-flight copies of this step, so
            # it is dropped (not reused) and freed by torch's caching host allocator when done.
            size = max(_CAPACITY_ELEMS, 2 * (offset + n))
            pinned = torch.empty(size, dtype=dtype, pin_memory=True)
            self._pinned[dtype] = pinned
            offset = 0
        self._offsets[dtype] = offset + n
        return pinned[offset : offset + n]
