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

Failure model: a bad request (ValueError/TypeError from `LLMEngine.add_request`) fails only that
request. An exception from `step()` fails every in-flight request with EngineDeadError, marks the
engine dead (`check_health()` raises) and ends the thread; nothing waits forever.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kestrel.config import EngineConfig
from kestrel.outputs import RequestOutput
from kestrel.sampling_params import SamplingParams

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


class EngineDeadError(RuntimeError):
    """The engine loop has stopped (an error or a shutdown); no request can run."""


class QueueFullError(RuntimeError):
    """More requests are in flight than `max_num_seqs + max_queued_requests`."""


class RequestAbortedError(RuntimeError):
    """Raised by a RequestStream that was aborted before it finished."""


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    arrival_time: float
    priority: int


@dataclass
class _Abort:
    request_id: str


class _Stop:
    pass


_ACCEPTED = object()  # marker put on a stream when the engine thread has queued the request


class RequestStream:
    """The outputs of one request, in order; the last has `finished=True`. Lives on the loop."""

    def __init__(self, request_id: str, owner: AsyncLLMEngine) -> None:
        self.request_id = request_id
        self._owner = owner
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self.finished = False  # a finished output or an error was returned, or it was aborted
        self.aborted = False

    def _put(self, item: Any) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        assert isinstance(item, RequestOutput), item
        if item.finished:
            self.finished = True
        return item

    def abort(self) -> None:
        """Stops the request (no-op once finished): its KV blocks are freed at the next step
        boundary and a pending `__anext__` raises RequestAbortedError. Safe to call from
        `finally` blocks and cancelled tasks; must run on the event loop."""
        if self.finished:
            return
        self.finished = True
        self.aborted = True
        self._owner._abort(self.request_id)
        self._queue.put_nowait(RequestAbortedError(f"request {self.request_id!r} was aborted"))


class AsyncLLMEngine:
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
        self.max_queued_requests = max_queued_requests
        self._default_params = engine.default_sampling_params()
        self._commands: queue.SimpleQueue[_Add | _Abort | _Stop] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # loop-owned
        self._num_in_flight = 0  # loop-owned: accepted or pending requests not yet finished
        self._stats: dict[str, Any] = dict(engine.stats())
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

    def default_sampling_params(self) -> SamplingParams:
        """The model's generation-config defaults (a fresh copy each call)."""
        return self._default_params.clone()

    def stats(self) -> dict[str, Any]:
        """The scheduler's counters after the last engine-loop turn (see LLMEngine.stats)."""
        return dict(self._stats)

    @property
    def num_in_flight(self) -> int:
        return self._num_in_flight

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    def check_health(self) -> None:
        """Raises EngineDeadError when the engine cannot serve requests."""
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

    async def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        priority: int = 0,
    ) -> RequestStream:
        """Queues a request and returns its stream once the engine thread accepted it.

        Raises ValueError/TypeError (bad request; nothing queued), QueueFullError, or
        EngineDeadError. If the awaiting task is cancelled, the request is aborted."""
        self._check_accepting()
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        limit = self.max_queued_requests
        if limit is not None and self._num_in_flight >= self.max_num_seqs + limit:
            raise QueueFullError(
                f"the server is at capacity: {self._num_in_flight} requests in flight "
                f"(max_num_seqs={self.max_num_seqs} running + max_queued_requests={limit} "
                "waiting); retry later"
            )
        params = params if params is not None else self.default_sampling_params()
        stream = RequestStream(request_id, self)
        self._streams[request_id] = stream
        self._num_in_flight += 1
        self._commands.put(_Add(request_id, prompt, params, time.time(), priority))
        try:
            item = await stream._queue.get()
        except BaseException:
            stream.abort()
            raise
        if isinstance(item, BaseException):
            stream.finished = True
            raise item
        assert item is _ACCEPTED
        return stream

    async def generate(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs; closing the iterator early aborts the request."""
        stream = await self.add_request(request_id, prompt, params, priority=priority)
        try:
            async for output in stream:
                yield output
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        """Aborts a request by id (no-op when unknown or finished). Event loop only."""
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.abort()

    def _check_accepting(self) -> None:
        if self._closing:
            raise EngineDeadError("the server is shutting down and accepts no new requests")
        self.check_health()

    def _abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            self._num_in_flight -= 1
            self._commands.put(_Abort(request_id))

    def _deliver(self, items: list[tuple[str, Any]]) -> None:
        """Event loop: hands one step's results to their streams."""
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is None:
                continue  # aborted meanwhile
            stream._put(item)
            done = isinstance(item, BaseException) or (
                isinstance(item, RequestOutput) and item.finished
            )
            if done:
                del self._streams[request_id]
                self._num_in_flight -= 1

    def _fail_all(self, error: BaseException) -> None:
        """Event loop: ends every open stream with `error`."""
        for stream in list(self._streams.values()):
            stream._put(error)
        self._streams.clear()
        self._num_in_flight = 0

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
                if _LOG_INTERVAL_S and time.monotonic() - last_log > _LOG_INTERVAL_S:
                    last_log = time.monotonic()
                    if engine.has_unfinished_requests():
                        self._log_stats()
        except BaseException as exc:
            logger.exception("engine loop failed; failing all in-flight requests")
            self._dead = exc
            self._post(self._fail_all, EngineDeadError(f"the engine failed: {exc!r}"))

    def _drain_commands(self, block: bool) -> list[_Add | _Abort | _Stop]:
        commands: list[_Add | _Abort | _Stop] = []
        if block:
            commands.append(self._commands.get())
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, commands: list[_Add | _Abort | _Stop]) -> list[tuple[str, Any]]:
        replies: list[tuple[str, Any]] = []
        for command in commands:
            if isinstance(command, _Add):
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
            elif isinstance(command, _Abort) and command.request_id in self._active_ids:
                # Not active: it finished, or failed to be added, before the abort arrived.
                self._active_ids.discard(command.request_id)
                self._engine.abort_request(command.request_id)
        return replies

    def _abort_everything(self) -> None:
        for request_id in sorted(self._active_ids):
            self._engine.abort_request(request_id)
        self._active_ids.clear()
        self._stats = dict(self._engine.stats())

    def _log_stats(self) -> None:
        s = self._stats
        logger.info(
            "engine: %d running, %d waiting, KV cache %.1f%% used, prefix hits %d/%d tokens",
            s.get("num_running", 0),
            s.get("num_waiting", 0),
            100.0 * s.get("kv_cache_usage", 0.0),
            s.get("prefix_hit_tokens", 0),
            s.get("prefix_query_tokens", 0),
        )
