"""What AsyncLLMEngine hands out and passes around: its errors, the commands the event loop
sends to the engine thread, and RequestStream, the per-request output queue on the event loop."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol

from kestrel.errors import InvalidRequestError
from kestrel.outputs import RequestOutput
from kestrel.sampling_params import SamplingParams


class _StreamOwner(Protocol):
    def _abort(self, request_id: str) -> None: ...


class EngineDeadError(RuntimeError):
    """The engine loop has stopped (an error or a shutdown); no request can run."""


class QueueFullError(RuntimeError):
    """More requests are in flight than `max_num_seqs + max_queued_requests`."""


class RequestTooLargeError(InvalidRequestError):
    """A request creates more sequences than the server ever admits at once."""


class RequestAbortedError(RuntimeError):
    """Raised by a RequestStream that was aborted before it finished."""


class RequestFailedError(RuntimeError):
    """The engine failed this request alone (e.g. its sampling raised); others went on."""


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    arrival_time: float
    priority: int


@dataclass
class _AddBatch:
    adds: list[_Add]


@dataclass
class _Abort:
    request_id: str


class _Stop:
    pass


_ACCEPTED = object()  # marker put on a stream when the engine thread has queued the request


class RequestStream:
    """The outputs of one request, in order; the last has `finished=True`. Lives on the loop."""

    def __init__(self, request_id: str, owner: _StreamOwner, num_seqs: int = 1) -> None:
        self.request_id = request_id
        self.num_seqs = num_seqs  # sequences it holds against admission (its n)
        self._owner = owner
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self.finished = False  # a finished output or an error was returned, or it was aborted
        self.aborted = False
        self._held: Any = None  # an item taken off the queue while joining outputs

    def _put(self, item: Any) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        if self._held is not None:
            item, self._held = self._held, None
        else:
            item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        assert isinstance(item, RequestOutput), item
        # A reader that fell behind gets what queued up as one output (deltas joined), so a
        # busy server writes fewer, larger chunks instead of falling further behind.
        while not item.finished and not self._queue.empty():
            nxt = self._queue.get_nowait()
            if not isinstance(nxt, RequestOutput):
                self._held = nxt  # an error: delivered after what came before it
                break
            item = _joined(item, nxt)
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


def _joined(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """`later` with `earlier`'s deltas in front of its own (totals are `later`'s already)."""
    for a, b in zip(earlier.outputs, later.outputs):
        b.text_delta = a.text_delta + b.text_delta
        b.token_ids_delta = a.token_ids_delta + b.token_ids_delta
    return later


def check_admission(
    num_seqs: int, seqs_in_flight: int, max_num_seqs: int, max_queued: int | None
) -> None:
    """Admission counts sequences (prompts x n) against max_num_seqs + max_queued (None: no
    limit): a batch that can never fit raises RequestTooLargeError, one that does not fit now
    QueueFullError."""
    if max_queued is None:
        return
    capacity = max_num_seqs + max_queued
    if num_seqs > capacity:
        raise RequestTooLargeError(
            "n",
            f"the request creates {num_seqs} sequences (prompts x n), more than this server "
            f"ever admits at once: max_num_seqs ({max_num_seqs}) + max_queued_requests "
            f"({max_queued}) = {capacity}; send fewer prompts or a smaller n",
        )
    if seqs_in_flight + num_seqs > capacity:
        raise QueueFullError(
            f"the server is at capacity: {seqs_in_flight} sequences in flight and this request "
            f"adds {num_seqs} (max_num_seqs={max_num_seqs} running + max_queued_requests="
            f"{max_queued} waiting); retry later"
        )
