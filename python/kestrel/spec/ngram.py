"""N-gram prompt lookup: drafts copied from earlier in the sequence, no model.

For n from max_n down to min_n, find the most recent earlier occurrence of the sequence's last
n tokens (prompt + output) and propose the (up to) k tokens that followed it. Input-grounded
work (summaries, edits, extraction) repeats spans of its prompt, so the drafts often match."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class NgramProposer:
    def __init__(self, num_speculative_tokens: int, min_n: int, max_n: int) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        if num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
        self.k = num_speculative_tokens
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, tokens: np.ndarray, k: int | None = None) -> np.ndarray:
        """Up to `k` (default: the configured k) draft tokens following `tokens` [T] (int);
        empty when no n-gram of the allowed lengths occurred before."""
        k = self.k if k is None else min(k, self.k)
        tokens = np.asarray(tokens)
        total = tokens.shape[0]
        for n in range(min(self.max_n, total - 1), self.min_n - 1, -1):
            # Windows starting at 0 .. total - n - 1: each is followed by at least one token.
            windows = sliding_window_view(tokens[: total - 1], n)
            hits = np.flatnonzero((windows == tokens[total - n :]).all(axis=1))
            if hits.shape[0]:
                start = int(hits[-1]) + n  # the most recent occurrence
                return tokens[start : start + k].copy()
        return tokens[:0].copy()
