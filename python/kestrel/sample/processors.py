"""Logit edits that apply to every row, greedy or not, before the argmax / sampling split.

Order (each step sees the result of the previous one):
  1. logit_bias:        logits[i, t] += bias_i[t]
  2. min_tokens mask:   logits[i, t] = -inf for t in EOS ids + stop_token_ids of row i while
                        len(output_i) < min_tokens_i (EOS is not masked when ignore_eos is set)
  3. repetition penalty over prompt + output tokens of row i, with p = repetition_penalty_i:
                        logit > 0 -> logit / p, otherwise logit * p
  4. presence / frequency penalties over output tokens only, with c = count of t in output_i:
                        logit -= frequency_i * c + presence_i * (c > 0)
Rows whose parameters are neutral (no bias, p = 1, presence = frequency = 0) come out bit-for-bit
unchanged.
"""

from __future__ import annotations

import torch

from kestrel.sample.batch import SamplingBatch


def apply_logits_processors(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Apply steps 1-4 in place to `logits` [S, V] float32 and return it."""
    if batch.logit_bias_rows is not None:
        # Ids within a row are unique (dict keys), so accumulate only guards the contract.
        logits.index_put_(
            (batch.logit_bias_rows, batch.logit_bias_ids),
            batch.logit_bias_values,
            accumulate=True,
        )
    if batch.banned_rows is not None:
        logits[batch.banned_rows, batch.banned_ids] = -torch.inf
    if batch.use_repetition_penalty:
        _apply_repetition_penalty(logits, batch)
    if batch.use_additive_penalties:
        _apply_additive_penalties(logits, batch)
    return logits


def _apply_repetition_penalty(logits: torch.Tensor, batch: SamplingBatch) -> None:
    assert batch.output_token_counts is not None and batch.prompt_token_mask is not None
    seen = batch.prompt_token_mask | (batch.output_token_counts > 0)  # [S, V] bool
    penalty = batch.repetition_penalty.unsqueeze(1)  # [S, 1]
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    torch.where(seen, penalized, logits, out=logits)


def _apply_additive_penalties(logits: torch.Tensor, batch: SamplingBatch) -> None:
    assert batch.output_token_counts is not None
    counts = batch.output_token_counts  # [S, V] int32
    logits -= batch.frequency_penalty.unsqueeze(1) * counts
    logits -= batch.presence_penalty.unsqueeze(1) * (counts > 0)
