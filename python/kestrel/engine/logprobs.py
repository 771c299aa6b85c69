"""Logprob entries of generated tokens, built on the host from the sampler's device tensors."""

from __future__ import annotations

from collections.abc import Callable

from kestrel.outputs import Logprob
from kestrel.sample import SamplerOutput

# (sampled-token logprob per row, top-K ids per row or None, top-K logprobs per row or None)
HostLogprobs = tuple[list[float], list[list[int]] | None, list[list[float]] | None]


def host_logprobs(so: SamplerOutput | None) -> HostLogprobs | None:
    """One transfer per tensor for the whole step; None when no row asked for logprobs."""
    if so is None or so.logprobs is None:
        return None
    top_ids = so.top_logprob_ids.cpu().tolist() if so.top_logprob_ids is not None else None
    top_vals = so.top_logprobs.cpu().tolist() if so.top_logprobs is not None else None
    return so.logprobs.cpu().tolist(), top_ids, top_vals


def logprob_entry(
    rows: HostLogprobs, row: int, token: int, k: int, token_text: Callable[[int], str | None]
) -> dict[int, Logprob]:
    """{token id: Logprob} for one generated token: its top-k (ranks 1..k) and the sampled
    token itself (rank from the top-K when it is there, else None)."""
    sampled, top_ids, top_vals = rows
    entry: dict[int, Logprob] = {}
    rank = None
    if top_ids is not None and top_vals is not None:
        for r, (tid, val) in enumerate(zip(top_ids[row][:k], top_vals[row][:k]), start=1):
            entry[tid] = Logprob(val, r, token_text(tid))
        if token in top_ids[row]:
            rank = top_ids[row].index(token) + 1
    entry[token] = Logprob(sampled[row], rank, token_text(token))
    return entry
