"""The engine's side of speculation: drafts before schedule(), verification after.

`LLMEngine` makes one `Speculator` when `EngineConfig.speculative_config` is set. A drafted step
is never scheduled one step ahead: with n-gram drafts the engine overlaps steps only while
`may_draft` says no sequence will draft (a large batch, or every sequence below
min_acceptance_rate between probes); a draft model turns overlap off.
Before each schedule() the engine passes the running sequences that may speculate (greedy or
sampled, penalties, min_tokens, logprobs and grammars included; a grammar's drafts are cut to
what it allows, `spec/grammar_drafts.py`; none for the draft model): each gets the n-gram
proposer's drafts, or the draft model's (`spec/draft_runner.py`: one batched chain for all of
them), through `Scheduler.set_draft_tokens` (a sequence still in prefill refuses them and is
skipped; for the draft model that is asked first, with placeholder drafts whose kept count is
also the number of chain steps worth running, so no chain step is spent on it). The runner samples each verify row from its target distribution given the
drafts before it (`spec/draft_rows.py`; for n-gram drafts that is the rejection sampler:
`spec/rejection.py`), and `accept()` turns the rows' tokens into update()'s accepted tokens
(the drafts up to the first row whose token differs, then that row's token) and counts."""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from kestrel.spec.config import SpeculativeConfig
from kestrel.spec.draft_kv import DraftKV
from kestrel.spec.grammar_drafts import grammar_prefix
from kestrel.spec.greedy import SpecCounters, verify_greedy
from kestrel.spec.ngram import NgramProposer

if TYPE_CHECKING:
    from kestrel.spec.draft_runner import DraftRunner

logger = logging.getLogger(__name__)

# A sequence whose acceptance fell below min_acceptance_rate drafts again (a probe) this many
# steps later, so that the estimate follows a text that became predictable; each probe that
# finds it still below waits twice as long for the next, up to MAX_PROBE_INTERVAL steps (a
# probe costs a verify step, and with a draft model a catch-up and a chain; with a fixed 16, a
# random-weight draft made the 7B batch-1 step 43% slower on the H200, how much of it the probes
# was not measured). Recovering resets it.
PROBE_INTERVAL = 16
MAX_PROBE_INTERVAL = 512
# Weight of the newest step in a sequence's moving acceptance rate.
_RATE_WEIGHT = 0.5


class Speculator:
    def __init__(self, config: SpeculativeConfig, drafter: DraftRunner | None = None) -> None:
        """`drafter`: the draft model (method "draft_model"); None: n-gram lookup."""
        self.config = config
        self.drafter = drafter
        self.proposer = NgramProposer(
            config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max
        )
        self.counters = SpecCounters()
        self.rates: dict[int, float] = {}  # seq_id -> moving acceptance rate of its drafts
        self.num_skipped_steps = 0  # steps not speculated because the batch was large
        self._step = 0
        # seq_id -> (the step of its next probe, the wait after that one) while below the floor
        self._probes: dict[int, tuple[int, int]] = {}
        self.draft_kv = DraftKV()  # draft model: where its KV cache is current
        self._chained: set[int] = set()  # draft model: the sequences drafting this step

    def propose(
        self,
        scheduler: Any,
        candidates: Iterable[tuple[int, Sequence[int], Sequence[int]]],
        num_seqs: int = 0,
        live_seq_ids: Collection[int] | None = None,
        matchers: Mapping[int, Any] | None = None,
    ) -> None:
        """`candidates`: (seq_id, prompt ids, output ids) of sequences that may speculate;
        `num_seqs`: the sequences in the engine (speculation stops above disable_by_batch_size);
        `live_seq_ids`: the seq_ids in the engine (the draft model's bookkeeping forgets the
        others); `matchers`: the grammar of each constrained candidate (n-gram drafts are cut
        to what it allows: `spec/grammar_drafts.py`; the draft model skips them)."""
        self._step += 1
        if live_seq_ids is not None and self.drafter is not None:
            self.draft_kv.retain(live_seq_ids)
        limit = self.config.disable_by_batch_size
        if limit is not None and num_seqs > limit:
            self.num_skipped_steps += 1
            return
        floor = self.config.min_acceptance_rate
        live: dict[int, float] = {}
        probes: dict[int, tuple[int, int]] = {}
        ready = []
        for seq_id, prompt, output in candidates:
            rate = self.rates.get(seq_id)
            if rate is not None:
                live[seq_id] = rate
                if rate < floor:  # its drafts have been rejected lately: only probes draft
                    due, wait = self._probes.get(seq_id, (self._step + PROBE_INTERVAL, 0))
                    if self._step < due:
                        probes[seq_id] = (due, wait)
                        continue
                    wait = min(2 * (wait or PROBE_INTERVAL), MAX_PROBE_INTERVAL)
                    probes[seq_id] = (self._step + wait, wait)  # if this probe fails too
            if output:  # else still in prefill (its first token is not sampled yet)
                ready.append((seq_id, prompt, output))
        self.rates = live  # finished sequences drop out
        self._probes = probes  # and so do sequences back above the floor
        matchers = matchers or {}
        if self.drafter is not None:
            ready = [r for r in ready if r[0] not in matchers]
            self._propose_with_draft_model(scheduler, ready)
            return
        for seq_id, prompt, output in ready:
            tokens = np.concatenate(
                (np.asarray(prompt, dtype=np.int64), np.asarray(output, dtype=np.int64))
            )
            drafts = self.proposer.propose(tokens)
            matcher = matchers.get(seq_id)
            if matcher is not None and drafts.shape[0]:
                drafts = grammar_prefix(matcher, drafts)
            if drafts.shape[0] == 0:
                continue
            try:
                scheduler.set_draft_tokens(seq_id, drafts)
            except ValueError:  # not in decode this step (recomputing after a preemption)
                continue

    def skip(self, num_seqs: int) -> None:
        """A step scheduled without `propose` (launched ahead while no sequence may draft):
        the probe clock moves on, and a step skipped for the batch size is counted."""
        self._step += 1
        limit = self.config.disable_by_batch_size
        if limit is not None and num_seqs > limit:
            self.num_skipped_steps += 1

    def may_draft(self, seq_ids: Iterable[int], num_seqs: int) -> bool:
        """Whether the next `propose` may give any of `seq_ids` drafts (conservative: True
        for a sequence it knows nothing of). The engine overlaps steps only while this is
        False: a drafted step is scheduled with nothing of its requests in flight."""
        limit = self.config.disable_by_batch_size
        if limit is not None and num_seqs > limit:
            return False
        floor, step = self.config.min_acceptance_rate, self._step + 1
        for seq_id in seq_ids:
            rate = self.rates.get(seq_id)
            if rate is None or rate >= floor:
                return True
            due = self._probes.get(seq_id, (step + PROBE_INTERVAL, 0))[0]
            if step >= due:
                return True
        return False

    def _propose_with_draft_model(
        self, scheduler: Any, ready: list[tuple[int, Sequence[int], Sequence[int]]]
    ) -> None:
        """One batched chain of the draft model over the sequences in decode (each first
        catching up over the positions its draft KV missed: `spec/draft_kv.py`). Catch-up rows
        are bounded by the drafter's `max_catch_up_tokens` per step; a sequence further behind
        only catches up (part of) its gap this step and drafts the next."""
        drafter = self.drafter
        assert drafter is not None
        placeholder = np.zeros(self.config.num_speculative_tokens, dtype=np.int64)
        chosen: list[tuple[int, np.ndarray, int, int]] = []  # (seq_id, run, tokens, steps)
        behind: list[tuple[int, np.ndarray, int]] = []  # (seq_id, catch-up run, its start)
        budget = drafter.max_catch_up_tokens
        for seq_id, prompt, output in ready:
            num_tokens = len(prompt) + len(output)
            start = self.draft_kv.start_of(seq_id, num_tokens)
            if num_tokens - 1 - start > budget:  # too far behind to draft this step
                run = _tokens(prompt, output, start, start + max(budget, 0))
                if run.shape[0]:
                    behind.append((seq_id, run, start))
                    budget -= run.shape[0]
                continue
            try:  # is it in decode, and how many drafts may it take?
                kept = int(scheduler.set_draft_tokens(seq_id, placeholder))
            except ValueError:  # not in decode this step (recomputing after a preemption)
                continue
            if kept > 0:
                budget -= num_tokens - 1 - start
                run = _tokens(prompt, output, start, num_tokens)
                chosen.append((seq_id, run, num_tokens, kept))
        try:
            if behind:
                drafter.catch_up(
                    [b[1] for b in behind],
                    [b[2] for b in behind],
                    [scheduler.block_table(b[0]) for b in behind],
                )
                for seq_id, run, start in behind:
                    self.draft_kv.valid[seq_id] = start + run.shape[0]
            if not chosen:
                return
            drafts = drafter.propose(
                [c[1] for c in chosen],
                [c[2] for c in chosen],
                [c[3] for c in chosen],
                [scheduler.block_table(c[0]) for c in chosen],
            )
        except BaseException:
            for c in chosen:  # no placeholder draft may reach schedule()
                scheduler.set_draft_tokens(c[0], placeholder[:0])
            raise
        for (seq_id, _, num_tokens, _), d in zip(chosen, drafts):
            scheduler.set_draft_tokens(seq_id, d)
            self.draft_kv.caught_up(seq_id, num_tokens)
            self._chained.add(seq_id)

    def after_launch(self, out: Any) -> None:
        """The draft model's pass over the rows of the step just launched (`out`: its
        SchedulerOutput), enqueued after the target's: its KV at the same slots."""
        if self.drafter is None:
            return
        chained, self._chained = self._chained, set()
        step = self.draft_kv.rows_to_mirror(out, chained)
        if step is not None:
            self.drafter.mirror(step)

    def accept(self, out: Any, sampled: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """update()'s arguments for a step: the sampled tokens as they are (no drafts), or the
        accepted tokens and their count per sampled request."""
        if out.total_draft_tokens == 0:
            return sampled, None
        tokens, counts = verify_greedy(out, sampled)
        self.counters.record(out, counts)
        self.record_rates(out, counts)
        return tokens, counts

    def record_rates(self, out: Any, counts: np.ndarray) -> None:
        """Each drafted sequence's moving acceptance rate, from this step's accepted counts."""
        drafts = out.num_draft_tokens
        first_rows = out.sampled_query_start_loc[:-1]
        seq_ids = out.seq_ids[out.sampled_request_indices[first_rows]]
        for j in np.flatnonzero(drafts).tolist():
            seq_id = int(seq_ids[j])
            accepted = (int(counts[j]) - 1) / int(drafts[j])
            old = self.rates.get(seq_id)
            new = accepted if old is None else (1 - _RATE_WEIGHT) * old + _RATE_WEIGHT * accepted
            self.rates[seq_id] = new

    def as_stats(self) -> dict[str, Any]:
        return {**self.counters.as_stats(), "spec_decode_num_skipped_steps": self.num_skipped_steps}


def _tokens(prompt: Sequence[int], output: Sequence[int], start: int, end: int) -> np.ndarray:
    """Tokens start .. end - 1 of prompt + output, without joining the whole sequence."""
    n = len(prompt)
    head = list(prompt[start:end]) if start < n else []
    tail = list(output[max(start - n, 0) : max(end - n, 0)])
    return np.asarray(head + tail, dtype=np.int64)
