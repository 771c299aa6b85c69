"""Prompt logprobs in the engine: which rows of a step to score, and each request's tally.

A request with `prompt_logprobs = k` has its first sample (index 0) scored: every prefill chunk
of that sample names the rows whose logits predict a prompt token (row at position i predicts
token i + 1, for i < P - 1), the runner scores them in the same forward pass
(`runner/prompt_logprobs.py`) and the numbers land here, by position. When all P - 1 are in,
the request's `prompt_logprobs` list is built: None for the first token (nothing predicts it),
then one {token id: Logprob} per token: the top-k (ranks 1..k) and the prompt token itself
(its exact rank).

Prefix caching: a cached prefix is never recomputed, so its logits would be missing. The scored
sample is therefore admitted with a cache salt of its own (`cache_salt`), which no other request
shares: it never reads another request's blocks. After a preemption it may hit blocks of its own
(it computed them, and their rows were scored then); rows scored twice keep the first numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from kestrel.outputs import Logprob, PromptLogprobs
from kestrel.runner.prompt_logprobs import PromptLogprobRows, PromptLogprobsOut


def cache_salt(serial: int) -> str:
    """The prefix-cache salt of the engine's `serial`-th scored sequence (see the module note):
    no other request has it."""
    return f"kestrel/prompt-logprobs/{serial}"


@dataclass
class PromptTally:
    """The scored rows of one sequence's prompt so far, [P - 1] per array (row i: token i + 1)."""

    prompt_token_ids: list[int]
    k: int  # top-k asked, 0..20 (clamped to the vocabulary)
    num_scored: int = 0  # rows 0..num_scored-1 are in
    # Rows 0..num_planned-1 are in or in a launched step (overlap scheduling plans the next
    # step before the previous one's numbers are back).
    num_planned: int = 0
    logprobs: np.ndarray = field(init=False)
    ranks: np.ndarray = field(init=False)
    top_ids: np.ndarray = field(init=False)
    top_logprobs: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        n = max(0, len(self.prompt_token_ids) - 1)
        self.logprobs = np.zeros(n, dtype=np.float32)
        self.ranks = np.zeros(n, dtype=np.int64)
        self.top_ids = np.zeros((n, self.k), dtype=np.int64)
        self.top_logprobs = np.zeros((n, self.k), dtype=np.float32)

    @property
    def num_rows(self) -> int:
        return int(self.logprobs.shape[0])

    @property
    def done(self) -> bool:
        return self.num_scored >= self.num_rows

    def rows_of_chunk(self, start: int, count: int) -> tuple[int, int]:
        """For a chunk of `count` rows at positions start..: the positions [lo, hi) still to score. Raises when the chunk skips unscored positions."""
        lo = max(start, self.num_planned)
        hi = min(start + count, self.num_rows)
        if lo < hi and start > self.num_planned:
            raise RuntimeError(
                f"prompt logprobs: positions {self.num_planned}..{start - 1} were never computed "
                "(a prefix-cache hit on a request that asks prompt logprobs)"
            )
        return lo, max(lo, hi)

    def store(self, lo: int, hi: int, out: PromptLogprobsOut, first: int) -> None:
        """Rows [first, first + hi - lo) of `out` are positions [lo, hi)."""
        n = hi - lo
        self.logprobs[lo:hi] = out.logprobs[first : first + n]
        self.ranks[lo:hi] = out.ranks[first : first + n]
        self.top_ids[lo:hi] = out.top_ids[first : first + n, : self.k]
        self.top_logprobs[lo:hi] = out.top_logprobs[first : first + n, : self.k]
        self.num_scored = max(self.num_scored, hi)

    def entries(self, token_text: Callable[[int], str | None]) -> PromptLogprobs:
        """The finished list: None, then one entry per prompt token after the first."""
        result: PromptLogprobs = [None]
        logprobs = self.logprobs.tolist()
        ranks = self.ranks.tolist()
        top_ids = self.top_ids.tolist()
        top_vals = self.top_logprobs.tolist()
        for i in range(self.num_rows):
            token = self.prompt_token_ids[i + 1]
            entry: dict[int, Logprob] = {}
            for r, (tid, val) in enumerate(zip(top_ids[i], top_vals[i]), start=1):
                entry[tid] = Logprob(val, r, token_text(tid))
            if token not in entry:
                entry[token] = Logprob(logprobs[i], ranks[i], token_text(token))
            result.append(entry)
        return result


@dataclass
class _Chunk:
    tally: PromptTally
    lo: int
    hi: int
    first: int  # its first row in the step's PromptLogprobRows


class PromptRowPlan:
    """The rows of one step to score, and where their numbers go."""

    def __init__(self) -> None:
        self._chunks: list[_Chunk] = []
        self._rows: list[np.ndarray] = []
        self._targets: list[np.ndarray] = []
        self._num = 0
        self._k = 0

    def add(self, tally: PromptTally, first_row: int, start: int, count: int) -> None:
        lo, hi = tally.rows_of_chunk(start, count)
        if lo == hi:
            return
        tally.num_planned = hi
        self._chunks.append(_Chunk(tally, lo, hi, self._num))
        self._rows.append(np.arange(first_row + lo - start, first_row + hi - start))
        self._targets.append(np.asarray(tally.prompt_token_ids[lo + 1 : hi + 1], dtype=np.int64))
        self._num += hi - lo
        self._k = max(self._k, tally.k)

    def rows(self) -> PromptLogprobRows | None:
        if not self._chunks:
            return None
        rows = np.concatenate(self._rows).astype(np.int64)
        return PromptLogprobRows(rows, np.concatenate(self._targets), self._k)

    def store(self, out: PromptLogprobsOut | None) -> Iterable[PromptTally]:
        """Files the step's numbers; yields each tally that this step completed."""
        if out is None:
            return
        for c in self._chunks:
            was_done = c.tally.done
            c.tally.store(c.lo, c.hi, out, c.first)
            if c.tally.done and not was_done:
                yield c.tally
