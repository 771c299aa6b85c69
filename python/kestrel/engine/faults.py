"""Which step failures are fatal, and how one request fails alone.

A step exception is fatal to the engine (the async wrapper marks it dead) unless it can be
attributed to one request. Attributable: the sampling stage of one row raised something other
than a device failure (`ModelRunner` retries the batch row by row to find out which rows), or the
host processing of one sequence's new token raised (detokenizer, stop strings, logprob entries).
Such a request fails alone: its sequences are aborted in the scheduler (freeing their KV blocks),
its final `RequestOutput` has `finished=True` and `error` set, and every sequence of it that had
not finished gets `finish_reason="error"`. For n > 1, one failing sequence fails the request.

Not attributable, so fatal: a device failure anywhere (the device state is unknown after it), a
forward-pass failure (one pass serves every request), and a sampling failure of every row of a
multi-row batch taken apart (the rows are not to blame one by one).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from kestrel.ops import KernelError

if TYPE_CHECKING:
    from kestrel._core import Scheduler, SchedulerOutput
    from kestrel.engine.llm_engine import LLMEngine
    from kestrel.engine.request_state import RequestState, SequenceState

logger = logging.getLogger(__name__)

# Substrings of RuntimeError messages that torch uses for CUDA runtime / library failures.
_DEVICE_ERROR_MARKERS = ("CUDA error", "device-side assert", "CUBLAS_STATUS_", "CUDNN_STATUS_")
# A failed request's `RequestOutput.error` stays one line of at most this many characters.
_MAX_ERROR_CHARS = 500


def _device_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [torch.cuda.OutOfMemoryError, KernelError]
    for name in ("OutOfMemoryError", "AcceleratorError"):  # absent in older torch releases
        exc_type = getattr(torch, name, None)
        if isinstance(exc_type, type):
            types.append(exc_type)
    return tuple(types)


_DEVICE_ERROR_TYPES = _device_error_types()


def is_device_failure(exc: BaseException) -> bool:
    """True when `exc` (or an exception it was raised from or while handling) says the device
    failed: out of memory, an accelerator or kernel error, or a CUDA error / device-side assert
    reported through a RuntimeError. Such a failure is never blamed on one request."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _DEVICE_ERROR_TYPES):
            return True
        if isinstance(current, RuntimeError):
            message = str(current)
            if any(marker in message for marker in _DEVICE_ERROR_MARKERS):
                return True
        current = current.__cause__ or current.__context__
    return False


def error_message(exc: BaseException, stage: str) -> str:
    """The one-line `RequestOutput.error`: "<ExceptionType>: <message> (<what failed>)"."""
    text = " ".join(str(exc).split())
    if len(text) > _MAX_ERROR_CHARS:
        text = text[: _MAX_ERROR_CHARS - 3] + "..."
    return f"{type(exc).__name__}: {text} (this request's {stage} failed)"


def fail_request(
    scheduler: Scheduler,
    seqs: dict[int, tuple[RequestState, SequenceState]],
    state: RequestState,
    exc: BaseException,
    stage: str,
    drop_seq: Callable[[int], None],
) -> None:
    """Ends `state` with an error, leaving the other requests alone.

    Its unfinished sequences get finish_reason "error" and are aborted in the scheduler where it
    still holds them (one that finished in the core this step is gone already); all of them leave
    `seqs` through `drop_seq(seq_id)`, which also frees their slots of the runner's input batch.
    The caller reports the request (it is `finished` now), which removes it from the engine.
    Called before `scheduler.update()` the abort makes update() drop the step's tokens of these
    sequences; called after it, it frees their blocks (or finds them freed).
    """
    state.error = error_message(exc, stage)
    logger.warning("request %s failed: %s", state.request_id, state.error, exc_info=exc)
    for seq in state.seqs:
        if seq.finish_reason is None:
            seq.finish_reason = "error"
            if scheduler.contains(seq.core_id):
                scheduler.abort(seq.core_id)
    for seq_id in [k for k, (r, _) in seqs.items() if r is state]:
        drop_seq(seq_id)


def fail_sampled_rows(
    scheduler: Scheduler,
    seqs: dict[int, tuple[RequestState, SequenceState]],
    sampled_seq_ids: list[int],
    failed_rows: dict[int, BaseException],
    drop_seq: Callable[[int], None],
) -> dict[str, RequestState]:
    """Fails the requests that own the faulty rows of a step (row i = sampled_seq_ids[i]);
    returns them by request id. Call it before `scheduler.update()`."""
    failed: dict[str, RequestState] = {}
    for row, exc in sorted(failed_rows.items()):
        entry = seqs.get(sampled_seq_ids[row])
        if entry is None:  # a sibling row (n > 1) already failed this request
            continue
        fail_request(scheduler, seqs, entry[0], exc, "sampling", drop_seq)
        failed[entry[0].request_id] = entry[0]
    return failed


def abort_steps(engine: LLMEngine, outs: list[SchedulerOutput]) -> None:
    """The fatal path: steps that will produce no tokens (the one that failed and any launched
    after it, oldest first). Aborts every request in them first (freeing their blocks), then
    closes each step; update() drops the placeholder tokens of aborted requests."""
    for out in outs:
        for seq_id in out.seq_ids.tolist():
            if seq_id in engine._seqs:
                engine.abort_request(engine._seqs[seq_id][0].request_id)
    for out in outs:
        engine.scheduler.update(np.zeros(out.num_sampled, dtype=np.int64))
