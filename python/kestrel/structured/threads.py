"""A small pool of threads with large stacks, for llguidance's recursive grammar compiles.

`concurrent.futures.ThreadPoolExecutor` starts its threads lazily with the process-wide
default stack size (8 MiB on Linux), which a deep grammar overflows (a crash of the whole
process, not an exception). These threads are started at construction with the stack
asked for (virtual memory: only the pages a compile touches are committed). llguidance drops the
GIL while it validates or compiles, so a long compile here does not slow the engine's thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class GrammarThreads:
    def __init__(self, num_threads: int, stack_bytes: int, name: str) -> None:
        if num_threads < 1:
            raise ValueError(f"num_threads = {num_threads} is invalid; allowed: an int >= 1")
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self._threads = []
        with _STACK_SIZE_LOCK:  # threading.stack_size is process-wide: set, start, restore
            old = threading.stack_size(stack_bytes)
            try:
                for i in range(num_threads):
                    thread = threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                    thread.start()
                    self._threads.append(thread)
            finally:
                threading.stack_size(old)

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        if self._closed:
            raise RuntimeError("the grammar threads were shut down")
        future: Future[T] = Future()
        self._jobs.put((future, fn, args))
        return future

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue  # cancelled while it waited
            try:
                result = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiter
                future.set_exception(exc)
            else:
                future.set_result(result)

    def shutdown(self) -> None:
        """Cancels the jobs not started; a running one finishes on its (daemon) thread."""
        self._closed = True
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[0].cancel()
        for _ in self._threads:
            self._jobs.put(None)


_STACK_SIZE_LOCK = threading.Lock()
