"""Greedy verification of draft tokens, and the speculation counters.

The runner samples every sampled row of a drafted request (greedy: the argmax); row i of a
request with k drafts predicts the token after draft i - 1 (row 0: after its last known token).
The accepted tokens are the drafts up to the first one that differs from its row's prediction,
then that row's prediction (the correction, or the bonus token after k matches): exactly the
tokens plain greedy decoding would make, one step per token. Sampled rows go through the same
function: a row's token equals its draft exactly when the rejection sampler accepted the draft
(`kestrel.spec.rejection`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def verify_greedy(out: Any, sampled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`out`: the step's SchedulerOutput; `sampled` [num_sampled] int64: the target's token
    of each sampled row (logits_indices order). Returns the accepted tokens, flat, and their
    count per sampled request (update()'s `num_accepted`)."""
    loc = out.sampled_query_start_loc
    num_drafts = out.num_draft_tokens
    counts = np.ones(num_drafts.shape[0], dtype=np.int64)
    if out.total_draft_tokens == 0:
        return sampled, counts
    inputs = out.input_ids[out.logits_indices]  # draft i of a request: the input of row i + 1
    for j in np.flatnonzero(num_drafts).tolist():
        start, end = int(loc[j]), int(loc[j + 1])
        wrong = np.flatnonzero(sampled[start : end - 1] != inputs[start + 1 : end])
        counts[j] = (int(wrong[0]) if wrong.shape[0] else end - start - 1) + 1
    sizes = np.diff(loc)
    offset = np.arange(sampled.shape[0]) - np.repeat(loc[:-1], sizes)  # row within its request
    return sampled[offset < np.repeat(counts, sizes)], counts


@dataclass
class SpecCounters:
    """Cumulative, in vLLM's terms: drafts (requests that verified drafts in a step), draft
    tokens proposed and scheduled, and draft tokens accepted (not counting the bonus token)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    def record(self, out: Any, counts: np.ndarray) -> None:
        num_drafts = out.num_draft_tokens
        drafted = num_drafts > 0
        self.num_drafts += int(drafted.sum())
        self.num_draft_tokens += int(out.total_draft_tokens)
        self.num_accepted_tokens += int(np.maximum(counts[drafted] - 1, 0).sum())

    def as_stats(self) -> dict[str, Any]:
        return {
            "spec_decode_num_drafts": self.num_drafts,
            "spec_decode_num_draft_tokens": self.num_draft_tokens,
            "spec_decode_num_accepted_tokens": self.num_accepted_tokens,
        }
