"""What the two asyncio engine clients share: `AsyncLLMEngine` (the engine in a thread) and
`MPAsyncEngine` (the engine core in a process). Both keep the same loop-owned state
(`_streams`, `_num_in_flight`, `_num_seqs_in_flight`, `_closing`, `_stats`,
`_default_params`) and differ in how a batch reaches the engine and how outputs come back."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from kestrel.engine.request_stream import EngineDeadError, RequestStream
from kestrel.outputs import RequestOutput
from kestrel.sampling_params import SamplingParams


class EngineClientBase:
    _default_params: SamplingParams
    _stats: dict[str, Any]
    _streams: dict[str, RequestStream]
    _num_in_flight: int
    _num_seqs_in_flight: int
    _closing: bool

    def check_health(self) -> None:
        raise NotImplementedError

    async def add_requests(
        self,
        requests: list[tuple[str, str | list[int], SamplingParams | None]],
        *,
        priority: int = 0,
    ) -> list[RequestStream]:
        raise NotImplementedError

    def default_sampling_params(self) -> SamplingParams:
        """The model's generation-config defaults (a fresh copy each call)."""
        return self._default_params.clone()

    def stats(self) -> dict[str, Any]:
        """The engine's counters as last reported."""
        return dict(self._stats)

    @property
    def num_in_flight(self) -> int:
        return self._num_in_flight

    @property
    def num_seqs_in_flight(self) -> int:
        return self._num_seqs_in_flight

    async def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        priority: int = 0,
    ) -> RequestStream:
        """Queues one request and returns its stream once the engine accepted it (see
        `add_requests`). If the awaiting task is cancelled, the request is aborted."""
        streams = await self.add_requests([(request_id, prompt, params)], priority=priority)
        return streams[0]

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

    def stop_accepting(self) -> None:
        """New requests are refused from now on (EngineDeadError); running ones go on."""
        self._closing = True

    def _check_accepting(self) -> None:
        if self._closing:
            raise EngineDeadError("the server is shutting down and accepts no new requests")
        self.check_health()

    @staticmethod
    async def _await_admission(
        streams: list[RequestStream],
        is_cause: Callable[[BaseException], bool] = lambda exc: True,
    ) -> list[RequestStream]:
        """Waits for the engine's reply to every stream of a batch (all or nothing): on a
        refusal the accepted ones are aborted and the first refusal that `is_cause` picks (else
        the first) is raised; a cancelled wait aborts them all."""
        try:
            replies = [await stream._queue.get() for stream in streams]
        except BaseException:
            for stream in streams:
                stream.abort()
            raise
        failures = [r for r in replies if isinstance(r, BaseException)]
        if failures:
            for stream, reply in zip(streams, replies):
                if isinstance(reply, BaseException):
                    stream.finished = True
                else:
                    stream.abort()
            raise next((f for f in failures if is_cause(f)), failures[0])
        return streams
