"""Applying grammar bitmasks to the step's logits, on the logits' device.

A `GrammarMask` names the sampled rows that are constrained and holds one bitmask row each
(int32 words, bit j of word w allows token 32 * w + j, as llguidance writes them). Tokens past
the bitmask's width (model vocabularies padded beyond the tokenizer's) are never allowed.

`BitmaskApplier` (one per model runner) is the step's path: the host arrays go through one
pinned staging buffer (one non-blocking host-to-device copy) and `ops.apply_token_bitmask`
masks the logits (one CUDA kernel; the torch reference on CPU). `apply_bitmask` is the torch
reference path end to end (a pageable copy, then the torch ops), kept as the oracle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kestrel.ops.bitmask import (
    allowed_tokens,
    apply_token_bitmask,
    apply_token_bitmask_reference,
)

__all__ = ["BitmaskApplier", "GrammarMask", "allowed_tokens", "apply_bitmask"]


@dataclass(frozen=True)
class GrammarMask:
    rows: np.ndarray  # [R] int64: indices into the step's sampled rows
    bitmask: np.ndarray  # [R, W] int32

    def __post_init__(self) -> None:
        if self.rows.shape[0] != self.bitmask.shape[0]:
            raise ValueError(f"{self.rows.shape[0]} rows for {self.bitmask.shape[0]} bitmasks")

    def check_rows(self, num_rows: int) -> None:
        """ValueError unless the rows are distinct indices in [0, num_rows)."""
        rows = self.rows
        if rows.shape[0] == 0:
            return
        if int(rows.min()) < 0 or int(rows.max()) >= num_rows:
            raise ValueError(
                f"grammar mask rows span [{int(rows.min())}, {int(rows.max())}]; allowed: "
                f"indices in [0, {num_rows}) of the step's sampled rows"
            )
        if np.unique(rows).shape[0] != rows.shape[0]:
            raise ValueError("grammar mask rows must be distinct")


def apply_bitmask(logits: torch.Tensor, mask: GrammarMask) -> None:
    """The reference path: sets the disallowed tokens of the constrained rows of `logits`
    [S, V] to -inf, in place, with torch ops (a pageable copy of the bitmask to the device)."""
    mask.check_rows(logits.shape[0])
    if mask.rows.shape[0] == 0:
        return
    device = logits.device
    rows = torch.from_numpy(np.ascontiguousarray(mask.rows, dtype=np.int64)).to(device)
    bits = torch.from_numpy(np.ascontiguousarray(mask.bitmask, dtype=np.int32)).to(device)
    apply_token_bitmask_reference(logits, rows, bits)


class BitmaskApplier:
    """Stages a step's `GrammarMask` to the logits' device and applies it there.

    On CUDA, rows and bitmask are packed into one pinned host buffer (grown as needed, never
    shrunk) and copied in one non-blocking copy on the current stream; an event recorded after
    it guards the buffer: the next step waits on it before it writes the buffer again."""

    def __init__(self) -> None:
        self._pinned: torch.Tensor | None = None  # uint8, pinned
        self._copied: torch.cuda.Event | None = None  # the last copy out of _pinned

    def apply(self, logits: torch.Tensor, mask: GrammarMask) -> None:
        mask.check_rows(logits.shape[0])
        num = mask.rows.shape[0]
        if num == 0:
            return
        rows = np.ascontiguousarray(mask.rows, dtype=np.int64)
        bits = np.ascontiguousarray(mask.bitmask, dtype=np.int32)
        if logits.device.type != "cuda":
            apply_token_bitmask(logits, torch.from_numpy(rows), torch.from_numpy(bits))
            return
        rows_bytes, total = rows.nbytes, rows.nbytes + bits.nbytes
        host = self._staging(total)
        host_np = host[:total].numpy()
        host_np[:rows_bytes] = rows.view(np.uint8)
        host_np[rows_bytes:] = bits.reshape(-1).view(np.uint8)
        device = host[:total].to(logits.device, non_blocking=True)
        if self._copied is None:
            self._copied = torch.cuda.Event()
        self._copied.record(torch.cuda.current_stream(logits.device))
        rows_dev = device[:rows_bytes].view(torch.int64)
        bits_dev = device[rows_bytes:].view(torch.int32).view(num, bits.shape[1])
        apply_token_bitmask(logits, rows_dev, bits_dev)

    def _staging(self, nbytes: int) -> torch.Tensor:
        """The pinned buffer, at least `nbytes` long, free to write (its last copy is done)."""
        if self._copied is not None:
            self._copied.synchronize()
        if self._pinned is None or self._pinned.shape[0] < nbytes:
            size = max(nbytes, 2 * (self._pinned.shape[0] if self._pinned is not None else 0))
            self._pinned = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        return self._pinned
