"""The engine core in a process of its own: scheduler, executor and sampler, nothing else.

    front end 1 ──PUSH──┐                      ┌──PUSH──> PULL front end 1
    front end 2 ──PUSH──┼──> PULL  EngineCore ─┼──PUSH──> PULL front end 2
                        ┘   (step loop)        ┘

The core loop only steps: while there is work it polls its input socket without waiting, applies
what arrived (adds, aborts, samples a front end finished, utility calls), runs one engine step
and sends each front end the deltas of its requests (`core_protocol`); with no work it blocks on
the input socket (waking once a second to notice that its parent process is gone). Tokenization,
chat templates, detokenization, stop strings, logprob texts and the HTTP work all stay in the
front ends, so none of it competes with the step loop for an interpreter lock.

Admission is decided here, over all front ends: a batch of requests that would put more
sequences in flight than `max_num_seqs + max_queued_requests` is refused (too large ever, or
full now), as `AsyncLLMEngine` does in one process.

Failure: a step failure that the engine attributes to one request fails that request (its delta
carries `error`); any other exception is fatal: every front end gets `dead` with the error, and
the process exits with code 1.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import zmq

from kestrel.engine import core_protocol as cp
from kestrel.engine.request_stream import QueueFullError, RequestTooLargeError, check_admission
from kestrel.engine.step_stats import ThroughputLog
from kestrel.errors import InvalidRequestError

if TYPE_CHECKING:
    from kestrel.config import EngineConfig
    from kestrel.engine.llm_engine import LLMEngine
    from kestrel.engine.request_state import RequestState
    from kestrel.outputs import Logprob

logger = logging.getLogger(__name__)

# Seconds between two stats snapshots sent to the front ends, and between busy log lines.
STATS_INTERVAL_S = 0.05
LOG_INTERVAL_S = 10.0
# An idle core wakes this often (ms) to check that its parent process still runs.
IDLE_POLL_MS = 1000


@dataclass
class _Progress:
    """What the front end was told of one request so far."""

    client: int
    num_seqs: int
    first_sent: bool = False
    finish_sent: list[bool] = field(default_factory=list)
    prompt_logprobs_sent: bool = False


def _wire_logprobs(entry: dict[int, Logprob]) -> cp.Logprobs:
    return cp.Logprobs(
        list(entry), [lp.logprob for lp in entry.values()], [lp.rank for lp in entry.values()]
    )


def error_reply(request_id: str, exc: BaseException) -> cp.Reply:
    """The Reply refusing a request with `exc`, typed so the front end raises the same error."""
    if isinstance(exc, RequestTooLargeError):
        return cp.Reply(request_id, "too_large", str(exc), exc.param)
    if isinstance(exc, QueueFullError):
        return cp.Reply(request_id, "queue_full", str(exc))
    if isinstance(exc, InvalidRequestError):
        return cp.Reply(request_id, "invalid", str(exc), exc.param)
    if isinstance(exc, ValueError):
        return cp.Reply(request_id, "invalid", str(exc))
    if isinstance(exc, TypeError):
        return cp.Reply(request_id, "type", str(exc))
    return cp.Reply(request_id, "other", f"{type(exc).__name__}: {exc}")


def model_name(engine: Any) -> str:
    from kestrel.engine.async_engine import _model_name

    return _model_name(engine)


class EngineCore:
    """An LLMEngine with per-front-end routing, admission and delta outputs. Single-threaded:
    the transport (`run_core_loop`) calls `handle` for each message, then `step`, then takes
    `pending_outputs()`."""

    def __init__(self, engine: LLMEngine, max_queued_requests: int | None) -> None:
        self.engine = engine
        self.max_queued_requests = max_queued_requests
        self.max_num_seqs = engine.config.max_num_seqs
        self._progress: dict[str, _Progress] = {}
        self._seqs_in_flight = 0
        self._out: dict[int, cp.CoreOutputs] = {}
        self._last_stats = 0.0
        self._clients_seen: set[int] = set()  # every front end that registered
        self._throughput = ThroughputLog()
        self.stopped = False

    def facts(self) -> cp.CoreFacts:
        e = self.engine
        return cp.CoreFacts(
            model_name=model_name(e),
            max_model_len=e.max_model_len,
            vocab_size=e.model_config.vocab_size,
            max_num_seqs=self.max_num_seqs,
            default_params=cp.params_to_wire(e.default_sampling_params()),
            stats=self.stats(),
            pid=os.getpid(),
            cache_config=e.cache_config_info(),
            max_grammar_chars=e.config.max_grammar_chars,
        )

    def stats(self) -> dict[str, Any]:
        stats = dict(self.engine.stats())
        stats["num_seqs_in_flight"] = self._seqs_in_flight
        return stats

    @property
    def busy(self) -> bool:
        return self.engine.has_unfinished_requests()

    def _outputs(self, client: int) -> cp.CoreOutputs:
        out = self._out.get(client)
        if out is None:
            out = self._out[client] = cp.CoreOutputs(deltas=[], replies=[], utility=[])
        return out

    # ---- requests -------------------------------------------------------------------------

    def handle(self, msg: cp.CoreRequest) -> None:
        if isinstance(msg, cp.AddBatch):
            self._add_batch(msg)
        elif isinstance(msg, cp.Abort):
            for request_id in msg.request_ids:
                self._abort(request_id, msg.client)
        elif isinstance(msg, cp.FinishSample):
            progress = self._progress.get(msg.request_id)
            if progress is not None and progress.client == msg.client:
                if self.engine.finish_sequence(msg.request_id, msg.index):
                    progress.finish_sent[msg.index] = True  # the front end ended it
                if msg.request_id not in self.engine._requests:
                    self._forget(msg.request_id)
        elif isinstance(msg, cp.Utility):
            self._utility(msg)
        elif isinstance(msg, cp.Shutdown):
            self.stopped = True

    def _add_batch(self, msg: cp.AddBatch) -> None:
        out = self._outputs(msg.client)
        try:
            params = [cp.params_from_wire(r.params) for r in msg.requests]
            num_seqs = sum(p.n for p in params)
            check_admission(
                num_seqs, self._seqs_in_flight, self.max_num_seqs, self.max_queued_requests
            )
        except Exception as exc:  # noqa: BLE001 - the whole batch is refused
            out.replies += [error_reply(r.request_id, exc) for r in msg.requests]
            return
        added: list[str] = []
        for request, p in zip(msg.requests, params):
            if request.request_id in self._progress:
                exc: BaseException = InvalidRequestError(
                    None, f"request id {request.request_id!r} is already in use"
                )
            else:
                try:
                    self.engine.add_request(
                        request.request_id,
                        request.prompt_token_ids,
                        p,
                        priority=request.priority,
                        arrival_time=request.arrival_time,
                    )
                except Exception as e:  # noqa: BLE001 - a bad request fails only the batch
                    exc = e
                else:
                    added.append(request.request_id)
                    self._progress[request.request_id] = _Progress(
                        msg.client, p.n, finish_sent=[False] * p.n
                    )
                    self._seqs_in_flight += p.n
                    continue
            # All or nothing: undo what this batch added, refuse every request of it.
            for request_id in added:
                self._abort(request_id, msg.client)
            refused = {request.request_id: error_reply(request.request_id, exc)}
            out.replies += [
                refused.get(
                    r.request_id,
                    cp.Reply(r.request_id, "batch", f"refused with {request.request_id!r}"),
                )
                for r in msg.requests
            ]
            return
        out.replies += [cp.Reply(r.request_id) for r in msg.requests]

    def _abort(self, request_id: str, client: int) -> None:
        progress = self._progress.get(request_id)
        if progress is None or progress.client != client:
            return  # finished (or refused) before the abort arrived
        if request_id in self.engine._requests:
            self.engine.abort_request(request_id)
        self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        progress = self._progress.pop(request_id, None)
        if progress is not None:
            self._seqs_in_flight -= progress.num_seqs

    def _utility(self, msg: cp.Utility) -> None:
        out = self._outputs(msg.client)
        if msg.method == "stats":
            out.utility.append(cp.UtilityResult(msg.call_id, self.stats()))
        elif msg.method == "ping":
            out.utility.append(cp.UtilityResult(msg.call_id, "pong"))
        else:
            out.utility.append(cp.UtilityResult(msg.call_id, None, f"unknown call {msg.method!r}"))

    # ---- the step -------------------------------------------------------------------------

    def step(self) -> None:
        """One engine step; its deltas go to the front ends' pending outputs. Raises what the
        engine raises (fatal)."""
        changed, _ = self.engine.step_states()
        progress_of = self._progress
        outputs = self._out
        for request_id, state in changed.items():
            progress = progress_of.get(request_id)
            if progress is None:
                continue
            finished = state.finished
            if len(state.seqs) == 1 and not finished and progress.first_sent:
                delta = self._decode_delta(state)  # the common case, kept short
            else:
                delta = self._delta(state, progress)
            if delta is not None:
                out = outputs.get(progress.client)
                if out is None:
                    out = self._outputs(progress.client)
                out.deltas.append(delta)
            if finished:
                self.engine._requests.pop(request_id, None)
                self._forget(request_id)

    @staticmethod
    def _decode_delta(state: RequestState) -> cp.RequestDelta | None:
        """The delta of a one-sample request that is running and already reported once."""
        seq = state.seqs[0]
        ids = seq.row.output_token_ids
        start = seq.num_tokens_reported
        if start == len(ids) and state.error is None:
            return None
        logprobs = None
        if seq.logprobs is not None:
            logprobs = [_wire_logprobs(e) for e in seq.logprobs[start:]]
        seq.num_tokens_reported = len(ids)
        sample = cp.SampleDelta(seq.index, ids[start:], None, None, logprobs)
        return cp.RequestDelta(state.request_id, [sample], False, state.error)

    def _delta(self, state: RequestState, progress: _Progress) -> cp.RequestDelta | None:
        samples = []
        for seq in state.seqs:
            ids = seq.row.output_token_ids
            new = ids[seq.num_tokens_reported :]
            finish = seq.finish_reason if not progress.finish_sent[seq.index] else None
            if not new and finish is None:
                continue
            logprobs = None
            if seq.logprobs is not None:
                entries = seq.logprobs[seq.num_tokens_reported :]
                logprobs = [_wire_logprobs(e) for e in entries]
            seq.num_tokens_reported = len(ids)
            stop_token = seq.stop_reason if isinstance(seq.stop_reason, int) else None
            if finish is not None:
                progress.finish_sent[seq.index] = True
            samples.append(cp.SampleDelta(seq.index, list(new), finish, stop_token, logprobs))
        finished = state.finished
        prompt_logprobs = None
        if state.prompt_logprobs is not None and not progress.prompt_logprobs_sent:
            progress.prompt_logprobs_sent = True
            prompt_logprobs = [
                None if e is None else _wire_logprobs(e) for e in state.prompt_logprobs
            ]
        if not samples and not finished and state.error is None and prompt_logprobs is None:
            return None
        delta = cp.RequestDelta(state.request_id, samples, finished, state.error)
        delta.prompt_logprobs = prompt_logprobs
        if not progress.first_sent:
            progress.first_sent = True
            delta.num_cached_prompt_tokens = state.metrics.num_cached_prompt_tokens
            delta.first_scheduled_time = state.metrics.first_scheduled_time
        return delta

    def pending_outputs(self, *, force_stats: bool = False) -> dict[int, cp.CoreOutputs]:
        """The outputs gathered since the last call, per front end (stats attached at most
        every STATS_INTERVAL_S, to every front end, or when `force_stats`)."""
        now = time.monotonic()
        if force_stats or now - self._last_stats >= STATS_INTERVAL_S:
            self._last_stats = now
            stats = self.stats()
            for client in self._clients_seen:
                self._outputs(client).stats = stats
        out, self._out = self._out, {}
        return out

    def register(self, client: int) -> None:
        self._clients_seen.add(client)
        self._outputs(client).stats = self.stats()

    def fail_all(self, error: str) -> dict[int, cp.CoreOutputs]:
        """The `dead` message for every front end that ever talked to this core."""
        return {client: cp.CoreOutputs(dead=error) for client in self._clients_seen}

    def log_stats(self) -> None:
        logger.info("engine: %s", self._throughput.line(self.engine.stats(), time.monotonic()))


def run_core_loop(core: EngineCore, input_address: str, parent_pid: int | None) -> int:
    """Serves `core` on `input_address` until a Shutdown message, the parent's death or a fatal
    step failure (exit code 1)."""
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(input_address)
    pushes: dict[int, zmq.Socket] = {}
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    last_log = time.monotonic()
    config = getattr(core.engine, "config", None)
    log_stats = LOG_INTERVAL_S > 0 and not getattr(config, "disable_log_stats", False)

    def send(outputs: dict[int, cp.CoreOutputs]) -> None:
        for client, out in outputs.items():
            sock = pushes.get(client)
            if sock is not None:
                sock.send(cp.output_encoder.encode(out), copy=False)

    try:
        while not core.stopped:
            timeout = 0 if core.busy else IDLE_POLL_MS
            while poller.poll(timeout):
                timeout = 0
                try:
                    msg = cp.request_decoder.decode(pull.recv(copy=False))
                except msgspec.DecodeError:
                    logger.exception("engine core: undecodable message dropped")
                    continue
                if isinstance(msg, cp.Register):
                    sock = ctx.socket(zmq.PUSH)
                    sock.setsockopt(zmq.LINGER, 1000)
                    sock.connect(msg.output_address)
                    pushes[msg.client] = sock
                    core.register(msg.client)
                    continue
                core.handle(msg)
            if core.stopped:
                break
            if core.busy:
                core.step()
                if log_stats and time.monotonic() - last_log > LOG_INTERVAL_S:
                    last_log = time.monotonic()
                    core.log_stats()
            elif parent_pid is not None and os.getppid() != parent_pid:
                logger.warning("engine core: the parent process is gone; stopping")
                break
            send(core.pending_outputs(force_stats=not core.busy))
        return 0
    except Exception as exc:
        logger.exception("engine core failed; failing all in-flight requests")
        send(core.fail_all(f"the engine failed: {exc!r}"))
        return 1
    finally:
        for sock in pushes.values():
            sock.close(linger=1000)
        pull.close(linger=0)
        ctx.term()


def core_main(
    config: EngineConfig,
    input_address: str,
    max_queued_requests: int | None,
    ready_fd: int,
    log_level: str = "INFO",
) -> int:
    """The core process: loads the engine, writes its facts (or the start-up error) to
    `ready_fd` and closes it, then serves until told to stop. Returns the exit code."""
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s [core]: %(message)s",
    )
    parent_pid = os.getppid()

    def report(kind: str, payload: bytes | str, type_name: str = "") -> None:
        with os.fdopen(ready_fd, "wb") as ready:
            ready.write(msgspec.msgpack.encode((kind, payload, type_name)))

    try:
        from kestrel.engine.llm_engine import LLMEngine

        core = EngineCore(LLMEngine(config, token_texts=False), max_queued_requests)
        facts = core.facts()
    except BaseException as exc:
        logger.debug("engine core start-up failed", exc_info=exc)
        report("error", str(exc), type(exc).__name__)
        return 2
    report("ready", msgspec.msgpack.encode(facts))
    return run_core_loop(core, input_address, parent_pid)


def main() -> int:
    """`python -m kestrel.engine.core_process`: the spec (a pickled dict of core_main's
    arguments) comes on stdin from the process that starts the core (core_client.CoreProcess)."""
    spec = pickle.loads(sys.stdin.buffer.read())
    return core_main(**spec)


if __name__ == "__main__":
    sys.exit(main())
