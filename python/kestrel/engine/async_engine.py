"""AsyncLLMEngine: the synchronous LLMEngine behind an asyncio API, for the server.

Threads and ownership:
  * The LLMEngine is not thread-safe. After `start()` only the engine thread touches it.
  * The event loop owns the per-request streams (`_streams`, `_num_in_flight`). The engine thread
    never reads them: it hands results to the loop with `loop.call_soon_threadsafe`, one call per
    step carrying every output of that step.
  * Commands (add, abort, stop) go from the loop to the engine thread through a thread-safe
    queue and are applied between steps, so an abort frees its KV blocks at the next step
    boundary.
  * `stats()` reads a dict that the engine thread replaces (never mutates) after each loop turn.

Admission counts sequences: a request with n samples, or a batch of prompts, takes one slot per
sequence it creates against `max_num_seqs + max_queued_requests`; a batch that can never fit is
a RequestTooLargeError (a ValueError: a 400), one that does not fit now a QueueFullError (503).
A batch is queued as one command and applied before the next step (all or nothing).

Failure model: a bad request (ValueError/TypeError from `LLMEngine.add_request`) fails only that
request; so does a failure inside a step that the engine attributes to one request (its final
output carries `error`; its stream raises RequestFailedError). Any other exception from `step()`
fails every in-flight request with EngineDeadError, marks the engine dead (`check_health()`
raises) and ends the thread; nothing waits forever.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any

from kestrel.config import EngineConfig
from kestrel.engine.client_base import EngineClientBase
from kestrel.engine.request_stream import (
    _ACCEPTED,
    EngineDeadError,
    QueueFullError,
    RequestAbortedError,
    RequestFailedError,
    RequestStream,
    RequestTooLargeError,
    _Abort,
    _Add,
    _AddBatch,
    _Stop,
    check_admission,
)
from kestrel.engine.step_stats import ThroughputLog
from kestrel.outputs import RequestOutput
from kestrel.sampling_params import SamplingParams

__all__ = [
    "AsyncLLMEngine",
    "EngineDeadError",
    "QueueFullError",
    "RequestAbortedError",
    "RequestFailedError",
    "RequestStream",
    "RequestTooLargeError",
]

logger = logging.getLogger(__name__)

# Seconds between "engine is busy" log lines (0 disables them).
_LOG_INTERVAL_S = 10.0


def _model_name(engine: Any) -> str:
    """The name to serve the model under: the MODEL argument as given; for the default model
    (config.model None) the stem of the resolved file, when the engine exposes it."""
    if engine.config.model is not None:
        return str(engine.config.model)
    path = getattr(getattr(engine, "model_source", None), "path", None)
    return Path(str(path)).stem if path is not None else "default"


class AsyncLLMEngine(EngineClientBase):
    """Runs an LLMEngine in a background thread and streams RequestOutputs to asyncio tasks.

    Read-only facts about the model (tokenizer, max_model_len, vocab_size, model name, sampling
    defaults) are captured before the thread starts and are safe to read from any thread.
    """

    def __init__(self, engine: Any, *, max_queued_requests: int | None = None) -> None:
        if max_queued_requests is not None and max_queued_requests < 0:
            raise ValueError(
                f"max_queued_requests = {max_queued_requests!r} is invalid; allowed: None or an "
                "int >= 0"
            )
        self._engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len: int = engine.max_model_len
        self.vocab_size: int = engine.model_config.vocab_size
        self.model_name: str = _model_name(engine)
        self.max_num_seqs: int = engine.config.max_num_seqs
        self.max_grammar_chars: int = engine.config.max_grammar_chars
        self.max_queued_requests = max_queued_requests
        self._default_params = engine.default_sampling_params()
        self._commands: queue.SimpleQueue[_AddBatch | _Abort | _Stop] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # loop-owned
        self._num_in_flight = 0  # loop-owned: accepted or pending requests not yet finished
        self._num_seqs_in_flight = 0  # loop-owned: their sequences (sum of n)
        self._stats: dict[str, Any] = dict(engine.stats())
        info = getattr(engine, "cache_config_info", None)
        self.cache_config: dict[str, str] = dict(info()) if info is not None else {}
        self._throughput = ThroughputLog()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._dead: BaseException | None = None
        self._closing = False
        self._active_ids: set[str] = set()  # engine-thread-owned: ids queued in the LLMEngine

    @classmethod
    def from_config(
        cls, config: EngineConfig, *, max_queued_requests: int | None = None
    ) -> AsyncLLMEngine:
        from kestrel.engine.llm_engine import LLMEngine

        return cls(LLMEngine(config), max_queued_requests=max_queued_requests)

    # ---- facts and health -----------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    @property
    def is_dead(self) -> bool:
        """True once the engine loop failed (not after a clean shutdown)."""
        return self._dead is not None

    def check_health(self) -> None:
        """Raises EngineDeadError when the engine cannot serve requests."""
        if self._closing:
            raise EngineDeadError("the server is shutting down")
        if self._dead is not None:
            raise EngineDeadError(f"the engine loop has stopped: {self._dead}")
        if self._thread is None or not self._thread.is_alive():
            raise EngineDeadError("the engine loop is not running")

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the engine thread, bound to the running event loop."""
        if self._thread is not None:
            raise RuntimeError("the engine is already started")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="kestrel-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, drain_timeout_s: float = 0.0, join_timeout_s: float = 30.0) -> None:
        """Refuses new requests, waits up to `drain_timeout_s` for in-flight ones to finish,
        then aborts the rest (their streams raise EngineDeadError) and joins the thread."""
        self._closing = True
        deadline = time.monotonic() + drain_timeout_s
        while self._num_in_flight > 0 and self.is_running and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._thread is None:
            return
        self._commands.put(_Stop())
        await asyncio.to_thread(self._thread.join, join_timeout_s)
        if self._thread.is_alive():
            logger.error("the engine thread did not stop within %.0f s", join_timeout_s)
        self._fail_all(EngineDeadError("the server is shutting down; the request was aborted"))

    # ---- requests (event loop) ------------------------------------------------------------

    async def add_requests(
        self,
        requests: list[tuple[str, str | list[int], SamplingParams | None]],
        *,
        priority: int = 0,
    ) -> list[RequestStream]:
        """Queues (request_id, prompt, params) requests as one batch, applied before the next
        step, and returns their streams in order once all are accepted. All or nothing: if one
        is refused, the others are aborted and its error is raised (ValueError/TypeError,
        RequestTooLargeError, QueueFullError or EngineDeadError). If the awaiting task is
        cancelled, every request of the batch is aborted."""
        self._check_accepting()
        ids = [request_id for request_id, _, _ in requests]
        if len(set(ids)) != len(ids) or any(i in self._streams for i in ids):
            taken = next(i for i in ids if i in self._streams or ids.count(i) > 1)
            raise ValueError(f"request id {taken!r} is already in use")
        resolved = [p if p is not None else self.default_sampling_params() for _, _, p in requests]
        num_seqs = sum(p.n for p in resolved)
        check_admission(
            num_seqs, self._num_seqs_in_flight, self.max_num_seqs, self.max_queued_requests
        )
        now = time.time()
        streams = []
        adds = []
        for (request_id, prompt, _), params in zip(requests, resolved):
            stream = RequestStream(request_id, self, params.n)
            self._streams[request_id] = stream
            self._num_in_flight += 1
            self._num_seqs_in_flight += params.n
            streams.append(stream)
            adds.append(_Add(request_id, prompt, params, now, priority))
        self._commands.put(_AddBatch(adds))
        return await self._await_admission(streams)

    def fail_all(self, error: BaseException) -> None:
        """Ends every open stream with `error` and aborts its engine request (event loop)."""
        for request_id in list(self._streams):
            self._commands.put(_Abort(request_id))
        self._fail_all(error)

    def _abort(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            self._num_in_flight -= 1
            self._num_seqs_in_flight -= stream.num_seqs
            self._commands.put(_Abort(request_id))

    def _deliver(self, items: list[tuple[str, Any]]) -> None:
        """Event loop: hands one step's results to their streams."""
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is None:
                continue  # aborted meanwhile
            if isinstance(item, RequestOutput) and item.error:
                item = RequestFailedError(item.error)
            stream._put(item)
            done = isinstance(item, BaseException) or (
                isinstance(item, RequestOutput) and item.finished
            )
            if done:
                del self._streams[request_id]
                self._num_in_flight -= 1
                self._num_seqs_in_flight -= stream.num_seqs

    def _fail_all(self, error: BaseException) -> None:
        """Event loop: ends every open stream with `error`."""
        for stream in list(self._streams.values()):
            stream._put(error)
        self._streams.clear()
        self._num_in_flight = 0
        self._num_seqs_in_flight = 0

    # ---- the engine thread ----------------------------------------------------------------

    def _post(self, callback: Any, *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _run(self) -> None:
        engine = self._engine
        last_log = time.monotonic()
        config = getattr(engine, "config", None)
        log_stats = _LOG_INTERVAL_S > 0 and not getattr(config, "disable_log_stats", False)
        try:
            while True:
                busy = engine.has_unfinished_requests()
                commands = self._drain_commands(block=not busy)
                if any(isinstance(c, _Stop) for c in commands):
                    self._abort_everything()
                    return
                replies = self._apply(commands)
                if engine.has_unfinished_requests():
                    outputs = engine.step()
                    replies += [(o.request_id, o) for o in outputs]
                    self._active_ids.difference_update(o.request_id for o in outputs if o.finished)
                if replies:
                    self._post(self._deliver, replies)
                self._stats = dict(engine.stats())
                if log_stats and time.monotonic() - last_log > _LOG_INTERVAL_S:
                    last_log = time.monotonic()
                    if engine.has_unfinished_requests():
                        self._log_stats()
        except BaseException as exc:
            logger.exception("engine loop failed; failing all in-flight requests")
            self._dead = exc
            self._post(self._fail_all, EngineDeadError(f"the engine failed: {exc!r}"))

    def _drain_commands(self, block: bool) -> list[_AddBatch | _Abort | _Stop]:
        commands: list[_AddBatch | _Abort | _Stop] = []
        if block:
            commands.append(self._commands.get())
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, commands: list[_AddBatch | _Abort | _Stop]) -> list[tuple[str, Any]]:
        replies: list[tuple[str, Any]] = []
        for command in commands:
            if isinstance(command, _AddBatch):
                replies += self._apply_adds(command.adds)
            elif isinstance(command, _Abort) and command.request_id in self._active_ids:
                # Not active: it finished, or failed to be added, before the abort arrived.
                self._active_ids.discard(command.request_id)
                self._engine.abort_request(command.request_id)
        return replies

    def _apply_adds(self, adds: list[_Add]) -> list[tuple[str, Any]]:
        replies: list[tuple[str, Any]] = []
        for command in adds:
            try:
                self._engine.add_request(
                    command.request_id,
                    command.prompt,
                    command.params,
                    priority=command.priority,
                    arrival_time=command.arrival_time,
                )
            except Exception as exc:  # noqa: BLE001 - a bad request fails only itself
                replies.append((command.request_id, exc))
            else:
                self._active_ids.add(command.request_id)
                replies.append((command.request_id, _ACCEPTED))
        return replies

    def _abort_everything(self) -> None:
        for request_id in sorted(self._active_ids):
            self._engine.abort_request(request_id)
        self._active_ids.clear()
        self._stats = dict(self._engine.stats())

    def _log_stats(self) -> None:
        logger.info("engine: %s", self._throughput.line(self._stats, time.monotonic()))
