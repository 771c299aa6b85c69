"""LLMEngine: requests in, RequestOutputs out; one `step()` = schedule -> run -> update (the
step loop, overlap scheduling included, is the `EngineStep` half in engine/engine_step.py; this
file sets the engine up and admits, aborts and finishes requests).

Python keeps what the core does not need: sampling parameters, generators, detokenizers and
logprobs, keyed by the core's seq_id. The runner keeps the sampling state of the running
sequences in slots of its input batch (`runner/input_batch.py`): a sequence is added there on
its first sampled step (so waiting requests hold no slot) and removed when it finishes, fails,
is aborted or is preempted (re-added with its output so far when it runs again); every path
that drops a sequence from `_seqs` goes through `_drop_seq`, which frees its slot.
"""

from __future__ import annotations

import itertools
import logging
import time
import weakref

import numpy as np

from kestrel import _core
from kestrel.config import EngineConfig
from kestrel.engine.engine_step import EngineStep, Launched, needs_history
from kestrel.engine.prompt_logprobs import PromptRowPlan, PromptTally, cache_salt
from kestrel.engine.request_checks import check_request, tokenize_prompt
from kestrel.engine.request_state import (
    RequestState,
    SampleRow,
    SequenceState,
    child_generator,
)
from kestrel.engine.setup import (
    as_id_list,
    build_executor,
    check_draft_parallelism,
    check_quantization_device,
    load_draft_runner,
    load_engine_model,
    peek_model_config,
    resolve_device,
    sampling_defaults,
)
from kestrel.engine.step_stats import StepCounters
from kestrel.engine.structured_requests import StructuredRequests
from kestrel.executor import Executor
from kestrel.executor.multiproc import start_tensor_parallel, stop_tensor_parallel
from kestrel.layers.parallel import SINGLE_RANK
from kestrel.model_source import resolve_model
from kestrel.ops.kv_quant import require_fp8_kv_device, resolve_kv_cache_dtype
from kestrel.outputs import RequestMetrics
from kestrel.runner import ModelRunner
from kestrel.runner.capture import capture_graphs
from kestrel.runner.cpu_threads import configure_cpu_threads
from kestrel.runner.model_runner import StepResult
from kestrel.sampling_params import SamplingParams
from kestrel.spec.config import SpeculativeConfig
from kestrel.spec.speculator import Speculator
from kestrel.structured.limits import GrammarLimits
from kestrel.tokenizer import IncrementalDetokenizer

logger = logging.getLogger(__name__)


_INT32_MAX = 2**31 - 1


class LLMEngine(EngineStep):
    def __init__(self, config: EngineConfig, *, token_texts: bool = True) -> None:
        """`token_texts=False`: logprob entries carry no decoded token text (an engine core
        whose front end decodes them itself)."""
        self.config = config
        self._token_texts = token_texts
        self.device = resolve_device(config.device)
        if self.device.type == "cpu":
            configure_cpu_threads()  # physical cores, unless OMP_NUM_THREADS says otherwise
        self.model_source = resolve_model(config.model, revision=config.revision)
        check_quantization_device(config, self.model_source, self.device)
        if config.kv_cache_dtype != "auto":
            require_fp8_kv_device(self.device)  # before any weight is read
        spec = None
        if config.speculative_config is not None:
            spec = SpeculativeConfig.parse(config.speculative_config)
            check_draft_parallelism(spec, config)
        # Tensor or pipeline parallelism: rank 0 here, worker processes for the other ranks.
        self._tp_world = None
        if config.tensor_parallel_size > 1 or config.pipeline_parallel_size > 1:
            shape = peek_model_config(config, self.model_source)
            self._tp_world = start_tensor_parallel(
                config, str(self.model_source.path), self.device, shape
            )
        world = self._tp_world
        self._tp_group = world.group if world is not None else SINGLE_RANK
        try:
            loaded = load_engine_model(
                config, self.model_source, self.device, self._tp_group,
                pp_stage=world.pp if world is not None else None,
            )  # fmt: skip
            self.model, self.model_config, self.tokenizer, self.generation_config = loaded
        except BaseException:
            if self._tp_world is not None:
                stop_tensor_parallel(self._tp_world)
            raise
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
            kv_cache_dtype=resolve_kv_cache_dtype(config.kv_cache_dtype, self.dtype),
        )
        # Speculation with a draft model: its KV cache shares the target's block ids.
        self._drafter = None
        if spec is not None and spec.method == "draft_model":
            self._drafter = load_draft_runner(
                config, spec, self.device, mc, self.tokenizer, self.max_model_len
            )
        # Every step goes through the executor; it allocates the KV cache (every rank's).
        self.executor: Executor
        self.executor, num_blocks = build_executor(
            config, self.runner, self._tp_world, self.max_model_len, self._drafter
        )
        if self._tp_world is not None:
            weakref.finalize(self, self.executor.shutdown)  # type: ignore[attr-defined]
        # A drafted step is never scheduled one step ahead: speculation runs synchronous steps.
        # A draft model mirrors each step's rows (no placeholders): it runs synchronous steps;
        # with n-gram drafts the steps overlap while no sequence drafts (spec/speculator.py).
        draft_model = spec is not None and spec.method == "draft_model"
        async_scheduling = config.async_scheduling and not draft_model
        async_scheduling = async_scheduling and self._tp_world is None
        if config.async_scheduling and not async_scheduling:
            why = "a draft model" if self._tp_world is None else "multi-process execution"
            logger.info("overlap scheduling is off: %s runs synchronous steps", why)
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
                async_scheduling=async_scheduling,
            )
        )
        self._async = async_scheduling
        self._speculator: Speculator | None = None
        if spec is not None:
            self._speculator = Speculator(spec, self._drafter)
            logger.info("speculative decoding: %s", spec)
        self._inflight: Launched | None = None  # overlap scheduling: the step on the device
        self._history_seqs: set[int] = set()  # seq_ids whose steps cannot overlap (see above)
        capture_graphs(
            config,
            self.runner,
            self.max_model_len,
            multi_process=self._tp_world is not None,
            num_speculative_tokens=None if spec is None else spec.num_speculative_tokens,
            drafter=self._drafter,
        )
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
            "engine ready: %s on %s (%s), %d KV blocks (%s) of %d tokens (%d tokens), "
            "max_model_len %d",
            mc.architecture,
            self.device,
            self.dtype,
            num_blocks,
            str(self.runner.kv_cache_dtype).removeprefix("torch."),
            config.block_size,
            num_blocks * config.block_size,
            self.max_model_len,
        )

    # ---- set-up ---------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stops the tensor-parallel workers (if any); the engine is unusable afterwards."""
        stop = getattr(self.executor, "shutdown", None)
        if stop is not None:
            stop()

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
                if needs_history(params, seq.matcher):
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
        stats = {**self.scheduler.stats(), **self._step_counters.as_stats()}
        if self._speculator is not None:
            stats.update(self._speculator.as_stats())
        return stats

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
