"""min_p, top_k and top_p filters over temperature-scaled logits, in that order.

All three work on one descending sort of each row and mask tokens to -inf:
  min_p: drop token t when softmax(row)[t] < min_p * max(softmax(row)); 0 disables.
  top_k: keep exactly the k highest logits among those left (ties at the boundary are broken by
         sort order); k <= 0 disables, k >= V keeps all.
  top_p: renormalize what is left and keep the smallest prefix of the most likely tokens whose
         mass reaches top_p, i.e. keep token j (in sorted order) iff the mass strictly before it
         is < top_p. The top token always survives (the mass before it is 0 < top_p); 1 disables.
The result is scattered back to vocabulary order, so callers never see the sort.
"""

from __future__ import annotations

import torch


def apply_min_p_top_k_top_p(
    logits: torch.Tensor,
    min_p: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
) -> torch.Tensor:
    """Mask filtered tokens of `logits` [R, V] float32 to -inf; returns a new [R, V] tensor.

    min_p [R] float32 in [0, 1], top_k [R] int (<= 0 = disabled), top_p [R] float32 in (0, 1].
    Each row's result depends only on that row.
    """
    num_rows, vocab_size = logits.shape
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)  # [R, V] each
    drop = _min_p_drop(sorted_logits, min_p)
    drop |= _top_k_drop(top_k, num_rows, vocab_size, logits.device)
    sorted_logits = sorted_logits.masked_fill(drop, -torch.inf)
    sorted_logits = sorted_logits.masked_fill(_top_p_drop(sorted_logits, top_p), -torch.inf)
    return torch.empty_like(logits).scatter_(1, sorted_ids, sorted_logits)


def _min_p_drop(sorted_logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """[R, V] bool over sorted positions: prob < min_p * max prob (column 0 holds the max)."""
    probs = torch.softmax(sorted_logits, dim=-1)
    return probs < min_p.unsqueeze(1) * probs[:, :1]


def _top_k_drop(
    top_k: torch.Tensor, num_rows: int, vocab_size: int, device: torch.device
) -> torch.Tensor:
    """[R, V] bool over sorted positions: position >= k (nothing when k <= 0)."""
    k = torch.where(top_k > 0, top_k.long(), vocab_size).clamp_max(vocab_size)  # [R]
    positions = torch.arange(vocab_size, device=device).expand(num_rows, vocab_size)
    return positions >= k.unsqueeze(1)


def _top_p_drop(sorted_logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[R, V] bool over sorted positions: mass strictly before the position >= top_p."""
    probs = torch.softmax(sorted_logits, dim=-1)
    # Exclusive prefix sum: column j holds the mass of columns < j (0 at column 0).
    mass_before = torch.nn.functional.pad(torch.cumsum(probs, dim=-1)[:, :-1], (1, 0))
    # top_p == 1 must keep every token, even when rounding pushes the prefix sum past 1.
    return (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
