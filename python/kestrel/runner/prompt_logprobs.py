"""Prompt logprobs of one step's prefill rows, computed on the device, returned small.

A request that asks for prompt logprobs has, in each of its prefill chunks, rows whose logits
predict its next prompt token (the row at position i predicts token i + 1). The engine names
those rows and their target tokens (`PromptLogprobRows`); the runner projects them to logits a
few rows at a time (never the whole chunk's full-vocabulary logits at once), takes the
log-softmax, and keeps per row only the target's logprob and rank and the top-k: the small
arrays of `PromptLogprobsOut`, moved to the host once per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class PromptLogprobRows:
    """The rows of a step to score (plain arrays: picklable for a multi-process executor)."""

    rows: np.ndarray  # [R] int64: row indices into the step's token rows
    targets: np.ndarray  # [R] int64: the prompt token each row predicts
    num_top: int  # K >= 0: top-k entries per row (the largest any scored request asked)

    @property
    def num_rows(self) -> int:
        return int(self.rows.shape[0])


@dataclass(frozen=True)
class PromptLogprobsOut:
    """Host arrays, row r for `PromptLogprobRows.rows[r]`."""

    logprobs: np.ndarray  # [R] float32: logprob of the target token
    ranks: np.ndarray  # [R] int64: 1 + the number of tokens strictly more likely than it
    top_ids: np.ndarray  # [R, K] int64, most likely first
    top_logprobs: np.ndarray  # [R, K] float32


def score_prompt_rows(
    hidden: torch.Tensor,
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    spec: PromptLogprobRows,
    rows_per_pass: int,
) -> PromptLogprobsOut:
    """`hidden` [T, hidden] of the step; logits are made for at most `rows_per_pass` rows at a
    time (the memory plan covers the sampler's [max_num_seqs, vocab] working set)."""
    device = hidden.device
    rows = torch.from_numpy(spec.rows).to(device)
    targets = torch.from_numpy(spec.targets).to(device)
    num = spec.num_rows
    k = spec.num_top
    values = torch.empty(num, dtype=torch.float32, device=device)
    ranks = torch.empty(num, dtype=torch.int64, device=device)
    top_ids = torch.empty((num, k), dtype=torch.int64, device=device)
    top_vals = torch.empty((num, k), dtype=torch.float32, device=device)
    for lo in range(0, num, max(1, rows_per_pass)):
        hi = min(num, lo + rows_per_pass)
        logits = compute_logits(hidden[rows[lo:hi]])  # [r, vocab]
        logprobs = torch.log_softmax(logits.to(torch.float32), dim=-1)
        target = logprobs.gather(1, targets[lo:hi].unsqueeze(1))  # [r, 1]
        values[lo:hi] = target.squeeze(1)
        ranks[lo:hi] = (logprobs > target).sum(dim=1) + 1
        if k > 0:
            vals, ids = logprobs.topk(min(k, logprobs.shape[1]), dim=-1, sorted=True)
            top_vals[lo:hi] = vals
            top_ids[lo:hi] = ids
        del logits, logprobs
    return PromptLogprobsOut(
        values.cpu().numpy(), ranks.cpu().numpy(), top_ids.cpu().numpy(), top_vals.cpu().numpy()
    )
