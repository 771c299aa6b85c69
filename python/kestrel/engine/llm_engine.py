"""LLMEngine: requests in, RequestOutputs out; one `step()` = schedule -> run -> update.

    batch = scheduler.schedule()             # C++ kestrel._core
    result = executor.execute(batch, slots)  # the model runner: torch (+ kernels)
    done = scheduler.update(result.ids)      # C++: append tokens, stop checks, free blocks
    executor.append_tokens(slots, done.ids)  # the runner's persistent sampling state

Python keeps what the core does not need: sampling parameters, generators, detokenizers and
logprobs, keyed by the core's seq_id. The runner keeps the sampling state of the running
sequences in slots of its input batch (`runner/input_batch.py`): a sequence is added there on
its first sampled step (so waiting requests hold no slot) and removed when it finishes, fails,
is aborted or is preempted (re-added with its output so far when it runs again); every path
that drops a sequence from `_seqs` goes through `_drop_seq`, which frees its slot.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kestrel import _core
from kestrel.config import EngineConfig
from kestrel.engine.faults import abort_steps, fail_request, fail_sampled_rows
from kestrel.engine.logprobs import host_logprobs, logprob_entry
from kestrel.engine.prompt_logprobs import PromptRowPlan, PromptTally, cache_salt
from kestrel.engine.request_checks import check_request, tokenize_prompt
from kestrel.engine.request_state import (
    RequestState,
    SampleRow,
    SequenceState,
    child_generator,
)
from kestrel.engine.setup import as_id_list, load_tokenizer, resolve_device, sampling_defaults
from kestrel.engine.step_stats import StepCounters
from kestrel.engine.structured_requests import StructuredRequests
from kestrel.executor import Executor, StepInput, UniProcExecutor
from kestrel.loader import load_model, read_generation_config
from kestrel.loader.gguf_loader import GGUFFile, gguf_generation_config, load_gguf_model
from kestrel.model_source import resolve_model
from kestrel.ops._dispatch import kernels_available
from kestrel.outputs import RequestMetrics, RequestOutput
from kestrel.runner import ModelRunner
from kestrel.runner.cpu_threads import configure_cpu_threads
from kestrel.runner.memory import plan_num_kv_blocks
from kestrel.runner.model_runner import StepFuture, StepResult
from kestrel.sampling_params import SamplingParams
from kestrel.structured.limits import GrammarLimits
from kestrel.tokenizer import IncrementalDetokenizer

logger = logging.getLogger(__name__)


_INT32_MAX = 2**31 - 1


@dataclass
class _Launched:
    """A step enqueued on the device whose tokens the engine has not processed yet."""

    out: _core.SchedulerOutput
    sampled_seq_ids: list[int]
    slots: list[int]  # the input-batch slot of each sampled row, at launch
    plan: PromptRowPlan | None
    future: StepFuture
    scheduled_at: float
    ahead: bool  # scheduled while the previous step was in flight
    slots_stale: bool = False  # a later launch preempted sequences (slots may have moved)


def _needs_history(params: SamplingParams, matcher) -> bool:
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


class LLMEngine:
    def __init__(self, config: EngineConfig, *, token_texts: bool = True) -> None:
        """`token_texts=False`: logprob entries carry no decoded token text (an engine core
        whose front end decodes them itself)."""
        self.config = config
        self._token_texts = token_texts
        self.device = resolve_device(config.device)
        if self.device.type == "cpu":
            configure_cpu_threads()  # physical cores, unless OMP_NUM_THREADS says otherwise
        self.model_source = resolve_model(config.model, revision=config.revision)
        if self.model_source.is_gguf:
            self._load_gguf(self.model_source.path)
        else:
            model_dir = self.model_source.path
            self.model, self.model_config = load_model(
                model_dir, config.dtype, self.device, config.load_format, seed=config.seed
            )
            self.tokenizer = load_tokenizer(config, self.model_source)
            self.generation_config = read_generation_config(model_dir)
        self.dtype = next(self.model.parameters()).dtype
        self.eos_token_ids = self._eos_ids()
        self._sampling_defaults = sampling_defaults(
            config.generation_config, self.generation_config
        )
        mc = self.model_config
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        if self.max_model_len > mc.max_position_embeddings:
            raise ValueError(
                f"max_model_len={self.max_model_len} exceeds the model's "
                f"max_position_embeddings={mc.max_position_embeddings}"
            )
        self.runner = ModelRunner(
            self.model,
            mc,
            device=self.device,
            dtype=self.dtype,
            block_size=config.block_size,
            seed=config.seed,
            max_num_seqs=config.max_num_seqs,
        )
        self.executor: Executor = UniProcExecutor(self.runner)  # every step goes through it
        num_blocks = plan_num_kv_blocks(config, self.runner, self.max_model_len)
        self.runner.allocate_kv_cache(num_blocks)
        self.scheduler = _core.Scheduler(
            _core.SchedulerConfig(
                num_blocks=num_blocks,
                block_size=config.block_size,
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                enable_prefix_caching=config.enable_prefix_caching,
                enable_chunked_prefill=config.enable_chunked_prefill,
                policy=config.scheduling_policy,
                async_scheduling=config.async_scheduling,
            )
        )
        self._async = config.async_scheduling
        self._inflight: _Launched | None = None  # overlap scheduling: the step on the device
        self._history_seqs: set[int] = set()  # seq_ids whose steps cannot overlap (see above)
        if self.device.type == "cuda" and not config.enforce_eager:
            # Graphs need every op on a kernel: the torch references synchronize with the host.
            if not kernels_available():
                logger.warning("CUDA kernels not built: running without CUDA graphs")
            elif self.dtype not in (torch.float16, torch.bfloat16):
                logger.warning(
                    "kernels run fp16/bf16 only: %s runs without CUDA graphs", self.dtype
                )
            else:
                self.runner.capture_decode_graphs(config.max_num_seqs, self.max_model_len)
        self._requests: dict[str, RequestState] = {}
        eos = self.eos_token_ids[0] if self.eos_token_ids else None
        limits = GrammarLimits(max_chars=config.max_grammar_chars)
        self._structured = StructuredRequests(self.tokenizer, eos, limits)
        self._failed_waiting: dict[str, RequestState] = {}  # reported by the next step
        self._seqs: dict[int, tuple[RequestState, SequenceState]] = {}  # core seq_id -> state
        # Sequences whose prompt logprobs are not all in yet (see engine/prompt_logprobs.py).
        self._scoring: dict[int, tuple[RequestState, PromptTally]] = {}
        self._salt_serials = itertools.count()
        self._step_counters = StepCounters()
        self.num_kv_blocks = num_blocks
        logger.info(
            "engine ready: %s on %s (%s), %d KV blocks of %d tokens (%d tokens), max_model_len %d",
            mc.architecture,
            self.device,
            self.dtype,
            num_blocks,
            config.block_size,
            num_blocks * config.block_size,
            self.max_model_len,
        )

    # ---- set-up ---------------------------------------------------------------------------

    def _load_gguf(self, path: Path) -> None:
        """Model, tokenizer and generation defaults from one GGUF file (parsed once)."""
        if self.config.load_format not in ("auto", "gguf", "dummy"):
            raise ValueError(
                f"load_format={self.config.load_format!r} cannot read the GGUF file {path}; "
                "use auto, gguf or dummy"
            )
        gguf_file = GGUFFile(path)
        self.model, self.model_config = load_gguf_model(
            gguf_file,
            self.config.dtype,
            self.device,
            dummy=self.config.load_format == "dummy",
            seed=self.config.seed,
        )
        self.tokenizer = load_tokenizer(self.config, self.model_source, gguf_file)
        self.generation_config = gguf_generation_config(gguf_file)

    def _eos_ids(self) -> tuple[int, ...]:
        ids = as_id_list(self.generation_config.get("eos_token_id"))
        ids += list(self.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return tuple(dict.fromkeys(ids))

    def default_sampling_params(self) -> SamplingParams:
        return SamplingParams.from_generation_config(self._sampling_defaults)

    # ---- requests -------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        priority: int = 0,
        arrival_time: float | None = None,
        stream: bool = True,
    ) -> None:
        """Queues a request (a text prompt or token ids). Raises ValueError for bad input;
        nothing is queued then. With stream=False, step() returns this request's output only
        once it has finished (cheaper: no per-step output, and the text is decoded at the end
        unless stop strings need it earlier)."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = params if params is not None else self.default_sampling_params()
        prompt_text, prompt_ids = tokenize_prompt(self.tokenizer, prompt)
        check_request(prompt_ids, params, self.model_config.vocab_size)
        state = RequestState(
            request_id=request_id,
            prompt=prompt_text,
            prompt_token_ids=prompt_ids,
            params=params,
            metrics=RequestMetrics(arrival_time or time.time()),
            stream=stream,
        )
        # Checked and compiled in a worker: a bad one fails this request alone, later.
        constraint = self._structured.constraint_of(params)
        core_ids = [request_id] if params.n == 1 else [f"{request_id}#{i}" for i in range(params.n)]
        state.seqs = [
            self._new_sequence(core_id, index, params, prompt_ids, stream)
            for index, core_id in enumerate(core_ids)
        ]
        if constraint is None:
            self._admit(state, priority)
        else:  # waits outside the scheduler until its matcher is compiled

            def admit(matcher, error) -> None:
                self._admit_constrained(state, priority, matcher, error)

            self._structured.submit(request_id, constraint, admit)
        self._requests[request_id] = state

    def _admit(self, state: RequestState, priority: int) -> None:
        """Adds the request's sequences to the scheduler (all or nothing for n > 1)."""
        params = state.params
        # The core counts in int32; no output outgrows max_model_len (an int32): clamping is exact.
        max_tokens = None if params.max_tokens is None else min(params.max_tokens, _INT32_MAX)
        added: list[str] = []
        try:
            for index, seq in enumerate(state.seqs):
                # Sample 0 of a request asking prompt logprobs is scored: it reads no
                # other request's cached prefix (a salt of its own).
                scored = index == 0 and params.prompt_logprobs is not None
                seq_id = self.scheduler.add_request(
                    seq.core_id,
                    np.asarray(state.prompt_token_ids, dtype=np.int64),
                    max_tokens=max_tokens,
                    min_tokens=min(params.min_tokens, _INT32_MAX),
                    eos_token_ids=list(self.eos_token_ids),
                    stop_token_ids=params.stop_token_ids,
                    ignore_eos=params.ignore_eos,
                    priority=priority,
                    cache_salt=cache_salt(next(self._salt_serials)) if scored else "",
                )
                added.append(seq.core_id)
                self._seqs[seq_id] = (state, seq)
                if _needs_history(params, seq.matcher):
                    self._history_seqs.add(seq_id)
                if scored:
                    self._start_scoring(seq_id, state, state.prompt_token_ids, params)
        except (ValueError, KeyError):
            for core_id in added:
                info = self.scheduler.request_info(core_id)
                self._drop_seq(info["seq_id"])
                self.scheduler.abort(core_id)
            raise

    def _admit_constrained(
        self, state: RequestState, priority: int, matcher, error: BaseException | None
    ) -> None:
        """A constrained request whose grammar compiled (or failed): into the scheduler, each
        sample with its own matcher; a failure fails the request alone."""
        if state.request_id not in self._requests:
            return  # aborted while it compiled
        try:
            if error is not None:
                raise error
            for k, seq in enumerate(state.seqs):
                seq.matcher = matcher if k == 0 else matcher.copy()
            self._admit(state, priority)
        except Exception as exc:  # noqa: BLE001 - this request's failure only
            state.error = f"{type(exc).__name__}: {exc} (this request's structured output failed)"
            for seq in state.seqs:
                seq.finish_reason = seq.finish_reason or "error"
            self._failed_waiting[state.request_id] = state

    def _start_scoring(
        self, seq_id: int, state: RequestState, prompt_ids: list[int], params: SamplingParams
    ) -> None:
        k = min(params.prompt_logprobs or 0, self.model_config.vocab_size)
        tally = PromptTally(prompt_ids, k)
        if tally.done:  # a one-token prompt: nothing to score
            state.prompt_logprobs = tally.entries(self._token_text)
        else:
            self._scoring[seq_id] = (state, tally)

    def _plan_prompt_rows(self, out) -> PromptRowPlan | None:
        """The rows of this step whose prompt logprobs are asked for (None: no such row)."""
        if not self._scoring:
            return None
        plan = PromptRowPlan()
        qsl = out.query_start_loc
        positions = out.positions
        for k, seq_id in enumerate(out.seq_ids.tolist()):
            entry = self._scoring.get(seq_id)
            if entry is not None:
                first = int(qsl[k])
                plan.add(entry[1], first, int(positions[first]), int(qsl[k + 1]) - first)
        return plan

    def _store_prompt_rows(self, plan: PromptRowPlan | None, result: StepResult) -> None:
        if plan is None:
            return
        for tally in plan.store(result.prompt_logprobs):
            for seq_id, (state, t) in list(self._scoring.items()):
                if t is tally:
                    del self._scoring[seq_id]
                    state.prompt_logprobs = tally.entries(self._token_text)

    def _new_sequence(
        self,
        core_id: str,
        index: int,
        params: SamplingParams,
        prompt_ids: list[int],
        stream: bool,
    ) -> SequenceState:
        detok = None
        if self.tokenizer is not None and params.detokenize:
            detok = IncrementalDetokenizer(
                self.tokenizer,
                prompt_ids,
                skip_special_tokens=params.skip_special_tokens,
                stop=params.stop,
                include_stop_str_in_output=params.include_stop_str_in_output,
            )
        row = SampleRow(
            params=params,
            prompt_token_ids=prompt_ids,
            output_token_ids=[],
            generator=child_generator(params, index, self.device),
            eos_token_ids=self.eos_token_ids,
        )
        logprobs = [] if params.logprobs is not None else None
        # Without streaming or stop strings, text is only needed at the end: decode it then.
        lazy = detok is not None and not stream and not params.stop
        return SequenceState(
            core_id=core_id,
            index=index,
            row=row,
            detokenizer=detok,
            logprobs=logprobs,
            lazy_detokenize=lazy,
        )

    def abort_request(self, request_id: str) -> None:
        """Ends a request now and frees its KV blocks. Unknown ids raise KeyError."""
        state = self._requests.pop(request_id, None)
        if state is None:
            raise KeyError(f"unknown request id {request_id!r}")
        self._failed_waiting.pop(request_id, None)
        if request_id in self._structured.waiting:  # not in the scheduler yet
            self._structured.cancel(request_id)
            for seq in state.seqs:
                seq.finish_reason = seq.finish_reason or "abort"
            return
        for seq in state.seqs:
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
                self.scheduler.abort(seq.core_id)
        for seq_id in [k for k, (r, _) in self._seqs.items() if r is state]:
            self._drop_seq(seq_id)

    def _drop_seq(self, seq_id: int) -> None:
        """Forgets a sequence (absent: nothing to do) and frees its input-batch slot."""
        entry = self._seqs.pop(seq_id, None)
        self._scoring.pop(seq_id, None)
        self._history_seqs.discard(seq_id)
        if entry is not None:
            self._release_slot(seq_id, entry[1].row)

    def _release_slot(self, seq_id: int, row: SampleRow) -> None:
        if row.slot is not None:
            row.slot = None
            self.executor.remove_sequence(seq_id)

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
        self.executor.append_tokens(slots, tokens)

    def finish_sequence(self, request_id: str, index: int, reason: str = "stop") -> bool:
        """Ends sample `index` of a request now (a front end found a stop string in its text)
        and frees its KV blocks; the whole request ends with its last sample. False when the
        request or the sample has already finished (nothing to do)."""
        state = self._requests.get(request_id)
        if state is None or not 0 <= index < len(state.seqs):
            return False
        if request_id in self._structured.waiting or request_id in self._failed_waiting:
            return False
        seq = state.seqs[index]
        if seq.finish_reason is not None:
            return False
        self.scheduler.finish(seq.core_id, reason)
        seq.finish_reason = reason
        for seq_id in [k for k, (_, s) in self._seqs.items() if s is seq]:
            self._drop_seq(seq_id)
        if state.finished:
            del self._requests[request_id]
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def num_unfinished_requests(self) -> int:
        return len(self._requests)

    def stats(self) -> dict:
        """The scheduler's counters and gauges, and the step counters (`step_stats`)."""
        return {**self.scheduler.stats(), **self._step_counters.as_stats()}

    def cache_config_info(self) -> dict[str, str]:
        """The KV-cache settings, as labels of the `cache_config_info` metric (vLLM's names)."""
        c = self.config
        return {
            "block_size": str(c.block_size),
            "cache_dtype": "auto",
            "enable_prefix_caching": str(c.enable_prefix_caching),
            "gpu_memory_utilization": str(c.gpu_memory_utilization),
            "num_gpu_blocks": str(self.num_kv_blocks),
            "num_cpu_blocks": "0",
        }

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
        `_needs_history`) waits for the one in flight instead of overlapping it."""
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
            if self._can_overlap():  # its tokens come with the next call
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
        return self._async and not self._history_seqs

    def _launch(self) -> _Launched:
        """Schedules a step and enqueues it on the device (not waiting for it)."""
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
                mask = functools.partial(self._structured.step_mask, matchers)
            plan = self._plan_prompt_rows(out)
            future = self.executor.launch(
                StepInput.from_scheduler_output(out),
                slots,
                plan.rows() if plan else None,
                grammar_mask=mask,
            )
        except Exception:
            abort_steps(self, [x.out for x in (self._inflight,) if x is not None] + [out])
            self._inflight = None
            raise
        ahead = self._inflight is not None
        return _Launched(out, sampled_seq_ids, slots, plan, future, scheduled_at, ahead)

    def _fail_rows(self, step: _Launched) -> dict[str, RequestState]:
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

    def _finish(self, step: _Launched) -> tuple[dict[str, RequestState], float]:
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
        upd = self.scheduler.update(result.sampled_token_ids)
        self._append_tokens(upd, step.slots, step.slots_stale)
        self._step_counters.record(out.num_tokens, out.num_decodes, len(upd.token_ids))
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
        row_of = {s: i for i, s in enumerate(sampled_seq_ids)} if logprob_rows else {}
        changed: dict[str, RequestState] = {}
        for seq_id, token in zip(upd.seq_ids.tolist(), upd.token_ids.tolist()):
            if seq_id not in self._seqs:  # its request failed earlier in this loop (n > 1)
                continue
            state, seq = self._seqs[seq_id]
            reason = finished.get(seq_id)
            try:
                seq.row.output_token_ids.append(token)
                if state.metrics.first_token_time is None:
                    state.metrics.first_token_time = now
                if seq.logprobs is not None and logprob_rows:
                    k = seq.row.params.logprobs or 0
                    entry = logprob_entry(logprob_rows, row_of[seq_id], token, k, self._token_text)
                    seq.logprobs.append(entry)
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
                        if reason is None:
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
