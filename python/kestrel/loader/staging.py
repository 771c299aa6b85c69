"""Checkpoint bytes -> the target device, without a float32 (or any host-side) detour.

A checkpoint tensor is a byte range of a memory-mapped file (a CPU uint8 tensor viewing the
mapping). `DeviceStager.to_device` moves it to the device the model lives on:

- CUDA: the range goes through two pinned staging buffers in turn. Filling one (a host memcpy
  out of the page cache, multi-threaded by torch) overlaps the asynchronous copy of the other to
  the device, and a call returns as soon as its last chunk is queued, so reading tensor k + 1
  overlaps the copy (and the dequantization / conversion kernels) of tensor k. Everything runs
  on the current stream, so kernels that consume the bytes are ordered after their copy.
- CPU: the view of the mapping itself (no copy; it is read-only, never write to it).
- any other device: a plain blocking `.to(device)`.

Conversions (f16 -> bf16, GGUF dequantization) then run on the device, on these bytes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch

# Bytes per pinned staging buffer (two of them). Large enough that per-chunk overhead is small
# next to the copy, small enough to pin quickly.
STAGING_BUFFER_BYTES = 64 << 20


def file_bytes(array: np.ndarray) -> torch.Tensor:
    """A flat CPU uint8 tensor over the memory of a (memory-mapped, read-only) numpy array,
    without copying it. Do not write to the result."""
    flat = np.asarray(array).reshape(-1).view(np.uint8)
    with warnings.catch_warnings():
        # torch warns that the array is not writable; the loaders only ever read these bytes.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(flat)


def normalize_device(device: torch.device | str) -> torch.device:
    """`device` with an index for CUDA ("cuda" -> the current CUDA device)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class DeviceStager:
    """Copies byte ranges of memory-mapped files to one device (see the module docstring).

    `buffer_bytes`: size of each of the two pinned buffers (default STAGING_BUFFER_BYTES).
    `progress(num_bytes)` is called as bytes are staged (per chunk), for a byte progress bar.
    Use as a context manager, or call `close()`: it waits for the copies still in flight.
    """

    def __init__(
        self,
        device: torch.device | str,
        *,
        buffer_bytes: int | None = None,
        progress: Callable[[int], object] | None = None,
    ) -> None:
        buffer_bytes = STAGING_BUFFER_BYTES if buffer_bytes is None else buffer_bytes
        if buffer_bytes < 1:
            raise ValueError(f"buffer_bytes={buffer_bytes} must be >= 1")
        self.device = normalize_device(device)
        self.buffer_bytes = buffer_bytes
        self.progress = progress
        self.bytes_staged = 0
        self._buffers: list[torch.Tensor] = []  # pinned uint8 [buffer_bytes], made on first use
        self._events: list[torch.cuda.Event] = []
        self._next = 0  # index of the buffer the next chunk goes through

    def __enter__(self) -> DeviceStager:  # noqa: PYI034 (final class; Self is 3.11+)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def to_device(self, src: torch.Tensor) -> torch.Tensor:
        """src: CPU uint8 [num_bytes] (a view of a file mapping). Returns uint8 [num_bytes] on
        the stager's device; on CUDA its copy may still be in flight on the current stream."""
        if src.dtype != torch.uint8 or src.dim() != 1 or src.device.type != "cpu":
            raise ValueError(
                f"to_device takes a 1-D CPU uint8 tensor, got {src.dtype} {tuple(src.shape)} "
                f"on {src.device}"
            )
        num_bytes = src.numel()
        if self.device.type == "cpu":
            out = src
        elif self.device.type != "cuda":
            out = src.to(self.device)
        else:
            out = torch.empty(num_bytes, dtype=torch.uint8, device=self.device)
            with torch.cuda.device(self.device):
                self._copy_through_pinned(src, out)
            return out  # progress was reported per chunk
        self.report(num_bytes)
        return out

    def _copy_through_pinned(self, src: torch.Tensor, out: torch.Tensor) -> None:
        if not self._buffers:
            self._buffers = [
                torch.empty(self.buffer_bytes, dtype=torch.uint8, pin_memory=True) for _ in "ab"
            ]
            self._events = [torch.cuda.Event(), torch.cuda.Event()]
        size = self.buffer_bytes
        for start in range(0, src.numel(), size):
            length = min(size, src.numel() - start)
            buffer, event = self._buffers[self._next], self._events[self._next]
            event.synchronize()  # the buffer's previous copy to the device has finished
            buffer[:length].copy_(src[start : start + length])
            out[start : start + length].copy_(buffer[:length], non_blocking=True)
            event.record()
            self._next = 1 - self._next
            self.report(length)

    def report(self, num_bytes: int) -> None:
        """Count `num_bytes` as loaded (progress); for bytes that reach the device otherwise."""
        self.bytes_staged += num_bytes
        if self.progress is not None:
            self.progress(num_bytes)

    def close(self) -> None:
        """Wait for the copies still reading the pinned buffers (the buffers stay for reuse)."""
        for event in self._events:
            event.synchronize()
