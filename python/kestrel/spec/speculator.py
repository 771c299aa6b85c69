"""The engine's side of speculation: drafts before schedule(), greedy verification after.

`LLMEngine` makes one `Speculator` when `EngineConfig.speculative_config` is set (and async
scheduling is off: a drafted step is never scheduled one step ahead, so the two do not mix yet).
Before each schedule() the engine passes the running sequences that may speculate (greedy,
no grammar, no penalties / min_tokens, no logprobs): each gets the n-gram proposer's drafts
through `Scheduler.set_draft_tokens` (a sequence still in prefill refuses them and is skipped).
After the step, `accept()` turns the runner's per-row greedy tokens into update()'s accepted
tokens and counts."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from kestrel.spec.config import SpeculativeConfig
from kestrel.spec.greedy import SpecCounters, verify_greedy
from kestrel.spec.ngram import NgramProposer

logger = logging.getLogger(__name__)


class Speculator:
    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self.proposer = NgramProposer(
            config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max
        )
        self.counters = SpecCounters()

    def propose(
        self, scheduler: Any, candidates: Iterable[tuple[int, Sequence[int], Sequence[int]]]
    ) -> None:
        """`candidates`: (seq_id, prompt ids, output ids) of sequences that may speculate."""
        for seq_id, prompt, output in candidates:
            if not output:  # still in prefill (its first token is not sampled yet)
                continue
            tokens = np.concatenate(
                (np.asarray(prompt, dtype=np.int64), np.asarray(output, dtype=np.int64))
            )
            drafts = self.proposer.propose(tokens)
            if drafts.shape[0] == 0:
                continue
            try:
                scheduler.set_draft_tokens(seq_id, drafts)
            except ValueError:  # not in decode this step (recomputing after a preemption)
                continue

    def accept(self, out: Any, sampled: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """update()'s arguments for a step: the sampled tokens as they are (no drafts), or the
        accepted tokens and their count per sampled request."""
        if out.total_draft_tokens == 0:
            return sampled, None
        tokens, counts = verify_greedy(out, sampled)
        self.counters.record(out, counts)
        return tokens, counts

    def as_stats(self) -> dict[str, Any]:
        return self.counters.as_stats()
