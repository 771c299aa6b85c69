"""Applying grammar bitmasks to the step's logits, on the logits' device.

A `GrammarMask` names the sampled rows that are constrained and holds one bitmask row each
(int32 words, bit j of word w allows token 32 * w + j, as llguidance writes them). Tokens past
the bitmask's width (model vocabularies padded beyond the tokenizer's) are never allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class GrammarMask:
    rows: np.ndarray  # [R] int64: indices into the step's sampled rows
    bitmask: np.ndarray  # [R, W] int32

    def __post_init__(self) -> None:
        if self.rows.shape[0] != self.bitmask.shape[0]:
            raise ValueError(f"{self.rows.shape[0]} rows for {self.bitmask.shape[0]} bitmasks")


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, W] int32 bitmask -> [R, vocab_size] bool (True = allowed)."""
    rows, words = bitmask.shape
    as_bytes = bitmask.contiguous().view(torch.uint8).view(rows, words * 4)  # little-endian
    shifts = torch.arange(8, dtype=torch.uint8, device=bitmask.device)
    bits = ((as_bytes.unsqueeze(-1) >> shifts) & 1).view(rows, words * 32).bool()
    if bits.shape[1] >= vocab_size:
        return bits[:, :vocab_size]
    pad = torch.zeros(rows, vocab_size - bits.shape[1], dtype=torch.bool, device=bits.device)
    return torch.cat([bits, pad], dim=1)


def apply_bitmask(logits: torch.Tensor, mask: GrammarMask) -> None:
    """Sets the disallowed tokens of the constrained rows of `logits` [S, V] to -inf, in place
    (one host-to-device copy of the bitmask)."""
    if mask.rows.shape[0] == 0:
        return
    device = logits.device
    bits = torch.from_numpy(mask.bitmask).to(device, non_blocking=True)
    allowed = allowed_tokens(bits, logits.shape[1])
    num = mask.rows.shape[0]
    if num == logits.shape[0] and np.array_equal(mask.rows, np.arange(num)):
        logits.masked_fill_(~allowed, float("-inf"))  # every row constrained: in place
        return
    rows = torch.from_numpy(mask.rows).to(device, non_blocking=True)
    constrained = logits.index_select(0, rows)
    constrained.masked_fill_(~allowed, float("-inf"))
    logits.index_copy_(0, rows, constrained)
