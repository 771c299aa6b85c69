"""PenaltyRows: the dense penalty state of the sequences that use a penalty, on the device.

  counts       [P, V] int32  how often each token occurs in a sequence's output so far
  prompt_seen  [P, V] bool   whether each token occurs in its prompt (repetition penalty only)

A penalized sequence holds one of the P rows (`take`, `release`: a stack, O(1)). Nothing is
allocated until the first one; P grows by doubling up to `max_rows` (copying the rows in use), so
the memory follows the most penalized sequences alive at once: P * V * 5 bytes (one sequence of a
152k vocabulary: 0.76 MB; 256 of them: 195 MB). It is kept, not shrunk, once allocated.
"""

from __future__ import annotations

import numpy as np
import torch


class PenaltyRows:
    def __init__(self, max_rows: int, vocab_size: int, device: torch.device) -> None:
        self.max_rows = max_rows
        self.vocab_size = vocab_size
        self.device = device
        self.counts: torch.Tensor | None = None  # [P, V] int32
        self.prompt_seen: torch.Tensor | None = None  # [P, V] bool
        self._free: list[int] = []
        self.num_taken = 0

    @property
    def capacity(self) -> int:
        return 0 if self.counts is None else int(self.counts.shape[0])

    def in_vocab(self, ids: np.ndarray) -> bool:
        return ids.size == 0 or (int(ids.min()) >= 0 and int(ids.max()) < self.vocab_size)

    def take(self, prompt_ids: np.ndarray, output_ids: np.ndarray) -> int:
        """A row holding the counts of `output_ids` and the mask of `prompt_ids` (pass an empty
        prompt for a sequence without a repetition penalty). Ids must lie in [0, V)."""
        if not self._free:
            self._grow()
        assert self.counts is not None and self.prompt_seen is not None
        row = self._free.pop()
        self.num_taken += 1
        self.counts[row].zero_()
        self.prompt_seen[row].zero_()
        if output_ids.size:
            ids = torch.from_numpy(output_ids).to(self.device)
            ones = torch.ones(ids.shape[0], dtype=torch.int32, device=self.device)
            self.counts[row].index_put_((ids,), ones, accumulate=True)
        if prompt_ids.size:
            self.prompt_seen[row, torch.from_numpy(prompt_ids).to(self.device)] = True
        return row

    def release(self, row: int) -> None:
        self._free.append(row)
        self.num_taken -= 1

    def count(self, rows: np.ndarray, ids: np.ndarray) -> None:
        """counts[rows[j], ids[j]] += 1 for every j (int64 arrays; ids checked by the caller)."""
        assert self.counts is not None
        where = (torch.from_numpy(rows).to(self.device), torch.from_numpy(ids).to(self.device))
        ones = torch.ones(rows.shape[0], dtype=torch.int32, device=self.device)
        self.counts.index_put_(where, ones, accumulate=True)

    def dense(
        self, source: torch.Tensor | None, num_rows: int, at: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        """[num_rows, V] zeros but for source[rows[j]] at row at[j] (`source`: counts or
        prompt_seen; `at` and `rows` int64 on the device)."""
        assert source is not None
        out = torch.zeros(num_rows, self.vocab_size, dtype=source.dtype, device=self.device)
        if at.shape[0]:
            out.index_copy_(0, at, source.index_select(0, rows))
        return out

    def _grow(self) -> None:
        old = self.capacity
        new = min(max(1, 2 * old), self.max_rows)
        if new == old:
            raise RuntimeError(f"all {old} penalty rows are taken")
        counts = torch.zeros(new, self.vocab_size, dtype=torch.int32, device=self.device)
        seen = torch.zeros(new, self.vocab_size, dtype=torch.bool, device=self.device)
        if self.counts is not None and self.prompt_seen is not None:
            counts[:old] = self.counts
            seen[:old] = self.prompt_seen
        self.counts, self.prompt_seen = counts, seen
        self._free = list(range(new - 1, old - 1, -1))
