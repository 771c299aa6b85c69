"""The engine's step: schedule -> launch -> (the previous step's) tokens -> update, with overlap.

`EngineStep` holds `LLMEngine`'s step loop (the class is split over two files; this half only
reads and updates the state `LLMEngine.__init__` sets up):

    out = scheduler.schedule()                   # C++ kestrel._core (one step ahead with overlap)
    future = executor.launch(step_input, slots)  # the model runner: enqueued, not waited for
    result = <previous>.future.result()          # the step before: its tokens on the host
    upd = scheduler.update(result.ids)           # C++: append tokens, stop checks, free blocks
    executor.append_tokens(slots, upd.ids)       # the runner's persistent sampling state

then the requests' token bookkeeping (logprobs, grammars, detokenization, stop strings) and
their outputs. See docs/architecture.md (overlap scheduling).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from kestrel import _core
from kestrel.engine.faults import abort_steps, fail_request, fail_sampled_rows
from kestrel.engine.logprobs import host_logprobs, logprob_entry
from kestrel.engine.prompt_logprobs import PromptRowPlan
from kestrel.engine.request_state import RequestState
from kestrel.executor import StepInput
from kestrel.outputs import RequestOutput
from kestrel.runner.model_runner import StepFuture, StepResult
from kestrel.sampling_params import SamplingParams


@dataclass
class Launched:
    """A step enqueued on the device whose tokens the engine has not processed yet."""

    out: _core.SchedulerOutput
    sampled_seq_ids: list[int]
    slots: list[int]  # the input-batch slot of each sampled row, at launch
    plan: PromptRowPlan | None
    future: StepFuture
    scheduled_at: float
    ahead: bool  # scheduled while the previous step was in flight
    slots_stale: bool = False  # a later launch preempted sequences (slots may have moved)


def row_drafts(out: Any, sampled_seq_ids: list[int]) -> list[list[int]]:
    """Per sampled row of a step with drafts: the draft tokens it assumes accepted (a drafted
    request's rows are consecutive; row i of its run has drafts 0..i-1, its run's inputs)."""
    inputs = out.input_ids[out.logits_indices].tolist()
    result: list[list[int]] = []
    start = 0
    for r, seq_id in enumerate(sampled_seq_ids):
        if r == 0 or seq_id != sampled_seq_ids[r - 1]:
            start = r
        result.append(inputs[start + 1 : r + 1])
    return result


def needs_history(params: SamplingParams, matcher) -> bool:
    """Sampling that reads the sequence's tokens so far on the host (so its next step cannot be
    scheduled before the last token is back): penalties (counts), min_tokens (the output length
    decides the ban), a grammar (its matcher advances by each token)."""
    return (
        matcher is not None
        or params.min_tokens > 0
        or params.repetition_penalty != 1.0
        or params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
    )


class EngineStep:
    """The step loop of LLMEngine (see the module docstring)."""

    def _sampled_slots(self, sampled_seq_ids: list[int]) -> list[int]:
        """The input-batch slot of each sampled row; a sequence sampled for the first time (or
        the first time since its preemption) gets one here."""
        slots = []
        for seq_id in sampled_seq_ids:
            row = self._seqs[seq_id][1].row
            if row.slot is None:
                row.slot = self.executor.add_sequence(
                    seq_id,
                    row.params,
                    row.prompt_token_ids,
                    row.generator,
                    row.eos_token_ids,
                    row.output_token_ids,
                )
            slots.append(row.slot)
        return slots

    def _append_tokens(self, upd, slots: list[int], stale: bool = False) -> None:
        """Tells the runner the tokens update() accepted: those of the sampled rows (`slots`,
        in order) less the rows whose sequence was aborted since. `stale`: a step launched
        since preempted some of these rows' sequences (their slots may hold others now)."""
        tokens = upd.token_ids
        if stale or upd.seq_ids.shape[0] != len(slots):  # map each row to its slot now
            now = [self._seqs[s][1].row.slot for s in upd.seq_ids.tolist()]
            keep = [k for k, slot in enumerate(now) if slot is not None]  # preempted: none
            if len(keep) != len(now):
                tokens = tokens[np.asarray(keep, dtype=np.int64)]
            slots = [now[k] for k in keep]
        if self._speculator is not None and len(set(slots)) != len(slots):
            # Several tokens of one sequence (accepted drafts): appended in rounds of unique
            # slots, each sequence's tokens in order.
            rounds: dict[int, tuple[list[int], list[int]]] = {}
            seen: dict[int, int] = {}
            for slot, token in zip(slots, np.asarray(tokens).tolist()):
                k = seen.get(slot, 0)
                seen[slot] = k + 1
                rounds.setdefault(k, ([], []))
                rounds[k][0].append(slot)
                rounds[k][1].append(token)
            for k in sorted(rounds):
                self.executor.append_tokens(rounds[k][0], np.asarray(rounds[k][1], np.int32))
            return
        self.executor.append_tokens(slots, tokens)

    # ---- the step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Runs one scheduler step; returns an output for every request that changed."""
        changed, now = self.step_states()
        return self._collect(changed, now)

    def step_states(self) -> tuple[dict[str, RequestState], float]:
        """One scheduler step without building outputs: the states of the requests that changed
        (finished ones are still in `_requests`: the caller collects them, see `_collect`), and
        the step's time.

        Overlap scheduling (`async_scheduling`): the step launched here runs on the device while
        the host processes the previous one's tokens; the launched step reads those tokens on
        the device (placeholder rows) and its own come back with the next call. A step whose
        sampling needs the tokens on the host first (penalties, min_tokens, grammars: see
        `needs_history`) waits for the one in flight instead of overlapping it."""
        self._structured.admit_ready()
        if self._structured.waiting and not self._seqs and self._inflight is None:
            self._structured.wait_any(0.05)  # only grammars to wait for
            self._structured.admit_ready()
        failed, self._failed_waiting = self._failed_waiting, {}
        launched = None
        if self._seqs and (self._inflight is None or self._can_overlap()):
            launched = self._launch()
        done, self._inflight = self._inflight, None
        if done is None:
            if launched is None:  # nothing in the scheduler (yet)
                return failed, time.time()
            if self._can_overlap() and launched.out.total_draft_tokens == 0:
                # its tokens come with the next call (a drafted step never stays in flight)
                self._inflight = launched
                return failed | self._fail_rows(launched), time.time()
            done, launched = launched, None
        self._inflight = launched
        if done.future.failed_rows and launched is None:
            failed |= self._fail_rows(done)
        changed, now = self._finish(done)
        changed = failed | changed
        if launched is not None and launched.future.failed_rows:
            changed |= self._fail_rows(launched)
        # A step scheduled ahead may be empty (its requests' last tokens were in flight).
        stalled = done.out.num_tokens == 0 and not done.ahead
        if stalled and launched is None and self._requests and not changed:
            raise RuntimeError("scheduler made no progress with requests pending")
        return changed, now

    def _can_overlap(self) -> bool:
        if not self._async or self._history_seqs:
            return False
        spec = self._speculator  # drafts need their requests' tokens back first
        return spec is None or not spec.may_draft(self._seqs.keys(), len(self._seqs))

    def _launch(self) -> Launched:
        """Schedules a step and enqueues it on the device (not waiting for it)."""
        if self._speculator is not None and self._inflight is None:
            self._speculator.propose(
                self.scheduler,
                self._spec_candidates(),
                len(self._seqs),
                live_seq_ids=self._seqs,
                matchers={i: s.matcher for i, (_, s) in self._seqs.items() if s.matcher},
            )
        elif self._speculator is not None:  # ahead of a step in flight: no drafts
            self._speculator.skip(len(self._seqs))
        out = self.scheduler.schedule()
        scheduled_at = time.time()  # a request's first scheduling ends its queue time
        sampled_seq_ids = out.seq_ids[out.sampled_request_indices].tolist()
        try:
            preempted = out.preempted_seq_ids.tolist()
            for seq_id in preempted:  # they give their slots back
                if seq_id in self._seqs:
                    self._release_slot(seq_id, self._seqs[seq_id][1].row)
            if preempted and self._inflight is not None:
                self._inflight.slots_stale = True  # its rows' slots changed hands
            slots = self._sampled_slots(sampled_seq_ids)
            matchers = [self._seqs[s][1].matcher for s in sampled_seq_ids]
            mask = None
            if any(m is not None for m in matchers):
                drafts = row_drafts(out, sampled_seq_ids) if out.total_draft_tokens else None
                mask = functools.partial(self._structured.step_mask, matchers, drafts)
            plan = self._plan_prompt_rows(out)
            future = self.executor.launch(
                StepInput.from_scheduler_output(out),
                slots,
                plan.rows() if plan else None,
                grammar_mask=mask,
            )
            if self._speculator is not None:  # a draft model's pass over the same rows
                self._speculator.after_launch(out)
        except Exception:
            abort_steps(self, [x.out for x in (self._inflight,) if x is not None] + [out])
            self._inflight = None
            raise
        ahead = self._inflight is not None
        return Launched(out, sampled_seq_ids, slots, plan, future, scheduled_at, ahead)

    def _spec_candidates(self):
        """Running sequences that may speculate: greedy or sampled (the runner samples each
        verify row from its target distribution given the drafts before it, penalties and
        min_tokens included: kestrel/spec/rejection.py), with logprobs or not (each accepted
        token's come from its own verify row), with a grammar or not (drafts cut to what it
        allows; each verify row masked by the grammar after the drafts before it), but no
        prompt rows being scored."""
        for seq_id, (_, seq) in self._seqs.items():
            if seq_id not in self._scoring:
                yield seq_id, seq.row.prompt_token_ids, seq.row.output_token_ids

    def _fail_rows(self, step: Launched) -> dict[str, RequestState]:
        """Fails the requests of the rows whose sampling failed alone in `step` (known at
        launch); called before the next schedule() and after the previous step's update(), so
        their tokens up to that step are kept and update() drops this step's."""
        return fail_sampled_rows(
            self.scheduler,
            self._seqs,
            step.sampled_seq_ids,
            step.future.failed_rows,
            self._drop_seq,
        )

    def _finish(self, step: Launched) -> tuple[dict[str, RequestState], float]:
        """Waits for a launched step's tokens and hands them to the scheduler and the requests."""
        out, sampled_seq_ids = step.out, step.sampled_seq_ids
        try:
            result = step.future.result()
            self._store_prompt_rows(step.plan, result)
        except Exception:
            later = [self._inflight.out] if self._inflight is not None else []
            abort_steps(self, [out] + later)  # not attributable to one request: fatal
            self._inflight = None
            raise
        tokens, num_accepted = result.sampled_token_ids, None
        decode_rows = out.num_decodes
        if self._speculator is not None:
            tokens, num_accepted = self._speculator.accept(out, tokens)
            drafted = out.num_draft_tokens > 0
            decode_rows += int(drafted.sum()) + out.total_draft_tokens  # verify rows
        upd = self.scheduler.update(tokens, num_accepted)
        self._append_tokens(upd, step.slots, step.slots_stale)
        self._step_counters.record(out.num_tokens, decode_rows, len(upd.token_ids))
        now = time.time()
        for seq_id in out.seq_ids.tolist():
            entry = self._seqs.get(seq_id)
            if entry is not None and entry[0].metrics.first_scheduled_time is None:
                metrics = entry[0].metrics
                metrics.first_scheduled_time = step.scheduled_at
                if self.scheduler.contains(entry[1].core_id):
                    info = self.scheduler.request_info(entry[1].core_id)
                    metrics.num_cached_prompt_tokens = max(0, info["num_cached_prompt_tokens"])
        return self._process_tokens(upd, sampled_seq_ids, result, now), now

    def _process_tokens(
        self, upd, sampled_seq_ids: list[int], result: StepResult, now: float
    ) -> dict[str, RequestState]:
        finished = dict(zip(upd.finished_seq_ids.tolist(), upd.finish_reasons))
        logprob_rows = host_logprobs(result.sampler_output)
        # Each sequence's first sampled row; a speculative step's accepted tokens are its rows
        # in order (token j: row first + j, drawn from the target given the j drafts before).
        row_of: dict[int, int] = {}
        if logprob_rows:
            for r, s in enumerate(sampled_seq_ids):
                row_of.setdefault(s, r)
        changed: dict[str, RequestState] = {}
        seq_ids = upd.seq_ids.tolist()
        # A speculative step gives a sequence several tokens: its finish reason is its last's.
        last = {s: i for i, s in enumerate(seq_ids)} if self._speculator is not None else None
        for i, (seq_id, token) in enumerate(zip(seq_ids, upd.token_ids.tolist())):
            if seq_id not in self._seqs:  # its request failed (n > 1) or stopped earlier here
                continue
            state, seq = self._seqs[seq_id]
            reason = finished.get(seq_id) if last is None or last[seq_id] == i else None
            try:
                seq.row.output_token_ids.append(token)
                if state.metrics.first_token_time is None:
                    state.metrics.first_token_time = now
                if seq.logprobs is not None and logprob_rows:
                    k = seq.row.params.logprobs or 0
                    entry = logprob_entry(logprob_rows, row_of[seq_id], token, k, self._token_text)
                    seq.logprobs.append(entry)
                    row_of[seq_id] += 1
                if seq.matcher is not None:
                    ends = self._structured.advance(seq.matcher, token, state.request_id)
                    if ends and reason is None:  # the grammar is complete: nothing may follow
                        self.scheduler.finish(seq.core_id, "stop")
                        reason = "stop"
                if seq.detokenizer is not None and (not seq.lazy_detokenize or reason is not None):
                    new_ids = seq.row.output_token_ids if seq.lazy_detokenize else [token]
                    step = seq.detokenizer.add_tokens(new_ids, finished=reason is not None)
                    seq.text = seq.detokenizer.output_text
                    seq.text_delta += step.text_delta
                    if step.stop_reason is not None:
                        seq.stop_reason = step.stop_reason
                        # Not finished by update() (which may have ended it at a later token
                        # of this step's accepted run: it is gone from the scheduler then).
                        if reason is None and seq_id not in finished:
                            self.scheduler.finish(seq.core_id, "stop")
                        reason = "stop"
            except Exception as exc:  # noqa: BLE001 - this sequence's fault: fail its request only
                fail_request(
                    self.scheduler, self._seqs, state, exc, "output processing", self._drop_seq
                )
                changed[state.request_id] = state
                continue
            if reason is not None:
                if (
                    reason == "stop"
                    and seq.stop_reason is None
                    and token in seq.row.params.stop_token_ids
                ):
                    seq.stop_reason = token
                seq.finish_reason = reason
                self._drop_seq(seq_id)
            if state.stream or reason is not None:
                changed[state.request_id] = state
        return changed

    def _collect(self, changed: dict[str, RequestState], now: float) -> list[RequestOutput]:
        outputs = []
        for request_id, state in changed.items():
            if not state.stream and not state.finished:
                continue
            if state.finished:
                state.metrics.finished_time = now
                self._requests.pop(request_id, None)
            outputs.append(state.output())
        return outputs

    def _token_text(self, token_id: int) -> str | None:
        if self.tokenizer is None or not self._token_texts:
            return None
        return self.tokenizer.decode([token_id], skip_special_tokens=False)
