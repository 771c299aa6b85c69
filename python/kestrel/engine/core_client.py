"""MPAsyncEngine: the asyncio engine API of `AsyncLLMEngine`, over an engine core process.

The core (`engine/core_process.py`) runs the scheduler, executor and sampler in a process of its
own; this client, in the API server process, keeps everything else: tokenization of text
prompts, the per-request streams, detokenization, stop strings and logprob texts
(`engine/output_processor.py`). Messages are msgspec structs over ZeroMQ (`core_protocol`).

One process starts the core (`MPAsyncEngine.launch`) and owns it: it stops it at shutdown, and
the core stops when its parent dies. With several API server processes (`kestrel serve
--api-server-count N`) a launcher starts the core and each API process connects its own client
(`MPAsyncEngine.connect`); requests are admitted by the core over all of them.

Loop ownership as in AsyncLLMEngine: streams and counters belong to the event loop; a reader
task receives the core's outputs and hands them to the streams. A watchdog notices a core that
died without a word (killed): every stream then fails with EngineDeadError and `is_dead` is set,
so the server exits with code 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from kestrel.config import EngineConfig
from kestrel.engine import core_protocol as cp
from kestrel.engine.client_base import EngineClientBase
from kestrel.engine.core_launcher import (
    CoreProcess,
    launch_core,
    new_ipc_address,
    pid_alive,
)
from kestrel.engine.output_processor import RequestOutputProcessor
from kestrel.engine.request_checks import tokenize_prompt
from kestrel.engine.request_stream import (
    _ACCEPTED,
    EngineDeadError,
    QueueFullError,
    RequestFailedError,
    RequestStream,
    RequestTooLargeError,
)
from kestrel.errors import InvalidRequestError
from kestrel.sampling_params import SamplingParams
from kestrel.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# Seconds between two checks that the core process still runs.
WATCHDOG_INTERVAL_S = 0.5
_client_ids = itertools.count(1)


class _RefusedWithBatch(RuntimeError):
    """A request refused only because another request of its batch was."""


def _reply_error(reply: cp.Reply) -> BaseException:
    if reply.kind == "too_large":
        return RequestTooLargeError(reply.param, reply.message)
    if reply.kind == "queue_full":
        return QueueFullError(reply.message)
    if reply.kind == "invalid":
        return InvalidRequestError(reply.param, reply.message)
    if reply.kind == "type":
        return TypeError(reply.message)
    if reply.kind == "batch":
        return _RefusedWithBatch(reply.message)
    return RuntimeError(reply.message)


class MPAsyncEngine(EngineClientBase):
    """The AsyncLLMEngine interface over an engine core process (see the module docstring)."""

    def __init__(
        self,
        facts: cp.CoreFacts,
        tokenizer: Tokenizer | None,
        input_address: str,
        *,
        core: CoreProcess | None = None,
        max_queued_requests: int | None = None,
        restart: tuple[EngineConfig, str] | None = None,
        restart_source: Callable[[], Awaitable[tuple[cp.CoreFacts, str]]] | None = None,
    ) -> None:
        """`restart`: (config, log level) to start a new core with when the one owned here
        dies (`--restart-core-on-failure`); `restart_source`: for a core another process owns
        (one of several API servers), waits for that process to start the new one and returns
        its (facts, input address); None for both: a dead core is the end (`is_dead`)."""
        self.tokenizer = tokenizer
        self.max_model_len = facts.max_model_len
        self.vocab_size = facts.vocab_size
        self.model_name = facts.model_name
        self.max_num_seqs = facts.max_num_seqs
        self.max_queued_requests = max_queued_requests
        self._default_params = cp.params_from_wire(facts.default_params)
        self._stats: dict[str, Any] = dict(facts.stats)
        self._core_pid = facts.pid
        self.cache_config: dict[str, str] = dict(facts.cache_config)
        self.max_grammar_chars: int = facts.max_grammar_chars
        self._core = core
        self._input_address = input_address
        self._client = os.getpid() * 1000 + next(_client_ids)
        self._streams: dict[str, RequestStream] = {}
        self._requests: dict[str, RequestOutputProcessor] = {}
        self._num_in_flight = 0
        self._num_seqs_in_flight = 0
        self._dead: BaseException | None = None
        self._restart = restart
        self._restart_source = restart_source
        self._restarting: asyncio.Task | None = None
        self.num_core_restarts = 0
        self._closing = False
        self._started = False
        self._stopped = False
        self._tasks: list[asyncio.Task] = []
        self._utility_calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count()
        self._ctx: zmq.asyncio.Context | None = None
        self._push: zmq.Socket | None = None
        self._output_address = ""
        self._pull: zmq.asyncio.Socket | None = None

    @classmethod
    def launch(
        cls,
        config: EngineConfig,
        *,
        max_queued_requests: int | None = None,
        log_level: str = "INFO",
        restart_on_failure: bool = False,
    ) -> MPAsyncEngine:
        """Starts an engine core process for `config` and a client that owns it; with
        `restart_on_failure` a core that dies is replaced by a new one (its requests fail)."""
        core, tokenizer = launch_core(
            config, max_queued_requests=max_queued_requests, log_level=log_level
        )
        assert core.facts is not None
        return cls(
            core.facts,
            tokenizer,
            core.input_address,
            core=core,
            max_queued_requests=max_queued_requests,
            restart=(config, log_level) if restart_on_failure else None,
        )

    @classmethod
    def connect(
        cls,
        facts: cp.CoreFacts,
        tokenizer: Tokenizer | None,
        input_address: str,
        *,
        max_queued_requests: int | None = None,
        restart_source: Callable[[], Awaitable[tuple[cp.CoreFacts, str]]] | None = None,
    ) -> MPAsyncEngine:
        """A client of a core another process started (one of several API servers);
        `restart_source`: that process replaces a core that dies (see __init__)."""
        return cls(
            facts,
            tokenizer,
            input_address,
            max_queued_requests=max_queued_requests,
            restart_source=restart_source,
        )

    # ---- facts and health -----------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return (
            self._started and not self._stopped and self._dead is None and self._restarting is None
        )

    @property
    def is_dead(self) -> bool:
        return self._dead is not None

    def check_health(self) -> None:
        if self._closing:
            raise EngineDeadError("the server is shutting down")
        if self._dead is not None:
            raise EngineDeadError(f"the engine core has stopped: {self._dead}")
        if self._restarting is not None:
            raise EngineDeadError("the engine core failed and is restarting; retry shortly")
        if not self.is_running:
            raise EngineDeadError("the engine client is not running")

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Connects to the core and starts the reader and the watchdog (on the running loop)."""
        if self._started:
            raise RuntimeError("the engine is already started")
        self._started = True
        self._ctx = zmq.asyncio.Context()
        self._output_address = new_ipc_address("out")
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.bind(self._output_address)
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.connect(self._input_address)
        self._send(cp.Register(self._client, self._output_address))
        self._tasks = [
            asyncio.create_task(self._read_outputs(), name="kestrel-core-reader"),
            asyncio.create_task(self._watchdog(), name="kestrel-core-watchdog"),
        ]

    async def shutdown(self, drain_timeout_s: float = 0.0, join_timeout_s: float = 30.0) -> None:
        """Refuses new requests, waits up to `drain_timeout_s` for in-flight ones, fails the
        rest, and stops the core when this client owns it."""
        self._closing = True
        if self._restarting is not None:
            self._restarting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._restarting
        deadline = time.monotonic() + drain_timeout_s
        while self._num_in_flight > 0 and self.is_running and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._started and not self._stopped:
            for request_id in list(self._streams):
                self._send(cp.Abort(self._client, [request_id]))
            if self._core is not None and self._dead is None:
                self._send(cp.Shutdown())
        self._stopped = True
        self._fail_all(EngineDeadError("the server is shutting down; the request was aborted"))
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._core is not None:
            await asyncio.to_thread(self._core.stop, join_timeout_s)
        for sock in (self._push, self._pull):
            if sock is not None:
                sock.close(linger=0)
        if self._ctx is not None:
            self._ctx.term()

    # ---- requests (event loop) ------------------------------------------------------------

    async def add_requests(
        self,
        requests: list[tuple[str, str | list[int], SamplingParams | None]],
        *,
        priority: int = 0,
    ) -> list[RequestStream]:
        """As AsyncLLMEngine.add_requests: one batch, admitted by the core before its next
        step, all or nothing; returns the streams once the core accepted them."""
        self._check_accepting()
        ids = [request_id for request_id, _, _ in requests]
        if len(set(ids)) != len(ids) or any(i in self._streams for i in ids):
            taken = next(i for i in ids if i in self._streams or ids.count(i) > 1)
            raise InvalidRequestError(None, f"request id {taken!r} is already in use")
        resolved = [p if p is not None else self.default_sampling_params() for _, _, p in requests]
        now = time.time()
        wire: list[cp.AddRequest] = []
        processors = []
        for (request_id, prompt, _), params in zip(requests, resolved):
            prompt_text, prompt_ids = tokenize_prompt(self.tokenizer, prompt)
            processors.append(
                RequestOutputProcessor(
                    request_id, prompt_text, prompt_ids, params, self.tokenizer, now
                )
            )
            core_params = params.clone(stop=[], detokenize=False)
            wire.append(
                cp.AddRequest(request_id, prompt_ids, cp.params_to_wire(core_params), now, priority)
            )
        streams = []
        for processor in processors:
            stream = RequestStream(processor.request_id, self, processor.params.n)
            self._streams[processor.request_id] = stream
            self._requests[processor.request_id] = processor
            self._num_in_flight += 1
            self._num_seqs_in_flight += processor.params.n
            streams.append(stream)
        self._send(cp.AddBatch(self._client, wire))
        return await self._await_admission(
            streams, lambda exc: not isinstance(exc, _RefusedWithBatch)
        )

    def fail_all(self, error: BaseException) -> None:
        ids = list(self._streams)
        if ids and self.is_running:
            self._send(cp.Abort(self._client, ids))
        self._fail_all(error)

    async def call_utility(self, method: str, timeout_s: float = 10.0) -> Any:
        """A utility call on the core ("stats", "ping"); raises on error or timeout."""
        self.check_health()
        call_id = next(self._call_ids)
        future = asyncio.get_running_loop().create_future()
        self._utility_calls[call_id] = future
        self._send(cp.Utility(self._client, call_id, method))
        try:
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._utility_calls.pop(call_id, None)

    def _send(self, msg: Any) -> None:
        if self._push is None:
            return
        try:
            self._push.send(cp.request_encoder.encode(msg), flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            logger.error("could not send to the engine core: %s", exc)

    def _abort(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        self._requests.pop(request_id, None)
        if stream is not None:
            self._num_in_flight -= 1
            self._num_seqs_in_flight -= stream.num_seqs
            self._send(cp.Abort(self._client, [request_id]))

    def _finish(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        self._requests.pop(request_id, None)
        if stream is not None:
            self._num_in_flight -= 1
            self._num_seqs_in_flight -= stream.num_seqs

    def _fail_all(self, error: BaseException) -> None:
        for stream in list(self._streams.values()):
            stream._put(error)
        self._streams.clear()
        self._requests.clear()
        self._num_in_flight = 0
        self._num_seqs_in_flight = 0
        for future in self._utility_calls.values():
            if not future.done():
                future.set_exception(EngineDeadError(str(error)))

    # ---- outputs (event loop) -------------------------------------------------------------

    async def _read_outputs(self) -> None:
        assert self._pull is not None
        while True:
            frame = await self._pull.recv(copy=False)
            try:
                outputs = cp.output_decoder.decode(frame)
            except msgspec.DecodeError:
                logger.exception("undecodable message from the engine core dropped")
                continue
            try:
                self._on_outputs(outputs)
            except Exception:
                logger.exception("processing the engine core's outputs failed")

    def _on_outputs(self, outputs: cp.CoreOutputs) -> None:
        if outputs.stats is not None:
            self._stats = outputs.stats
        for reply in outputs.replies:
            stream = self._streams.get(reply.request_id)
            if stream is None:
                continue
            if reply.kind is None:
                stream._put(_ACCEPTED)
            else:
                self._streams.pop(reply.request_id, None)
                self._requests.pop(reply.request_id, None)
                self._num_in_flight -= 1
                self._num_seqs_in_flight -= stream.num_seqs
                stream._put(_reply_error(reply))
        now = time.time()
        for delta in outputs.deltas:
            self._on_delta(delta, now)
        for result in outputs.utility:
            future = self._utility_calls.get(result.call_id)
            if future is not None and not future.done():
                if result.error is not None:
                    future.set_exception(RuntimeError(result.error))
                else:
                    future.set_result(result.result)
        if outputs.dead is not None:
            self._mark_dead(outputs.dead)

    def _on_delta(self, delta: cp.RequestDelta, now: float) -> None:
        processor = self._requests.get(delta.request_id)
        stream = self._streams.get(delta.request_id)
        if processor is None or stream is None:
            return  # aborted or finished here meanwhile
        try:
            output, stopped = processor.apply(delta, now)
        except Exception as exc:  # noqa: BLE001 - this request's output processing failed
            logger.warning("output processing of request %s failed: %r", delta.request_id, exc)
            self._finish(delta.request_id)
            self._send(cp.Abort(self._client, [delta.request_id]))
            stream._put(
                RequestFailedError(
                    f"{type(exc).__name__}: {exc} (this request's output processing failed)"
                )
            )
            return
        for index in stopped:
            self._send(cp.FinishSample(self._client, delta.request_id, index))
        if output is None:
            return
        if output.error:
            self._finish(delta.request_id)
            stream._put(RequestFailedError(output.error))
            return
        stream._put(output)
        if output.finished:
            self._finish(delta.request_id)

    def _mark_dead(self, reason: str) -> None:
        if self._dead is not None or self._restarting is not None:
            return
        logger.error("the engine core died: %s", reason)
        error = EngineDeadError(f"the engine failed: {reason}")
        owned = self._restart is not None and self._core is not None
        if (owned or self._restart_source is not None) and not self._closing:
            self._restarting = asyncio.get_running_loop().create_task(
                self._restart_core(), name="kestrel-core-restart"
            )
            self._fail_all(error)
            return
        self._dead = RuntimeError(reason)
        self._fail_all(error)

    async def _restart_core(self) -> None:
        """A new core in place of the dead one (`--restart-core-on-failure`): requests are
        refused with 503 meanwhile; if it cannot start, the engine is dead. A core this client
        owns it starts itself; otherwise it waits for the owner's new one (`restart_source`)."""
        assert self._ctx is not None
        core = None
        try:
            if self._restart_source is not None:
                logger.warning("waiting for the new engine core")
                facts, address = await self._restart_source()
            else:
                assert self._restart is not None and self._core is not None
                config, log_level = self._restart
                self._core.kill()
                logger.warning("starting a new engine core")
                core, _ = await asyncio.to_thread(
                    launch_core,
                    config,
                    max_queued_requests=self.max_queued_requests,
                    log_level=log_level,
                )
                assert core.facts is not None
                facts, address = core.facts, core.input_address
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported as the engine's death
            self._restarting = None
            self._dead = RuntimeError(f"the engine core died and could not restart: {exc}")
            logger.error("%s", self._dead)
            return
        if self._closing:  # shut down meanwhile
            if core is not None:
                core.kill()
            return
        if self._push is not None:
            self._push.close(linger=0)
        self._core, self._core_pid = core, facts.pid
        self._input_address = address
        self._stats = dict(facts.stats)
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.connect(self._input_address)
        self._send(cp.Register(self._client, self._output_address))
        if all(t.done() for t in self._tasks if t.get_name() == "kestrel-core-watchdog"):
            self._tasks.append(asyncio.create_task(self._watchdog(), name="kestrel-core-watchdog"))
        self.num_core_restarts += 1
        self._restarting = None
        logger.warning("the new engine core is ready (pid %d)", facts.pid)

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            if self._stopped:
                return
            alive = self._core.is_alive() if self._core is not None else pid_alive(self._core_pid)
            if not alive:
                code = self._core.exitcode if self._core is not None else None
                self._mark_dead(f"the engine core process exited (code {code})")
                return
