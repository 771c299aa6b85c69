"""Graceful shutdown with a drain window (`--shutdown-timeout`).

On SIGINT/SIGTERM uvicorn stops accepting connections and waits for the open ones. Kestrel adds:
the engine refuses new requests at once (503 with Retry-After; /health answers 503), requests
still running get up to the drain window to finish, and whatever still runs at its end is failed
with an error: a stream then ends with an error event and `data: [DONE]`, a non-streaming request
with a 503 body; nothing is cut silently. Then the engine stops and the process exits (code 0).

When the engine dies (a failure no single request caused: the device, the forward pass), its
requests have already ended with errors and /health answers 503; the server then shuts down
the same way and `kestrel serve` exits with code 1, so that a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import uvicorn

from kestrel.engine.async_engine import AsyncLLMEngine, EngineDeadError

logger = logging.getLogger(__name__)

# Seconds after the drain window for the final events and bodies to reach the clients.
FLUSH_GRACE_S = 10.0
_POLL_S = 0.02


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: AsyncLLMEngine, drain_s: float) -> None:
        if drain_s < 0:
            raise ValueError(f"drain_s = {drain_s} is invalid; allowed: a float >= 0")
        config.timeout_graceful_shutdown = drain_s + FLUSH_GRACE_S
        super().__init__(config)
        self.engine = engine
        self.drain_s = drain_s
        self.engine_died = False

    async def on_tick(self, counter: int) -> bool:
        if not self.engine_died and self.engine.is_dead:
            self.engine_died = True
            logger.error("the engine died: shutting the server down (exit code 1)")
            self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.engine.stop_accepting()
        cutoff = asyncio.create_task(self._fail_after_drain())
        try:
            await super().shutdown(sockets)
        finally:
            cutoff.cancel()

    async def _fail_after_drain(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_s
        while self.engine.num_in_flight > 0 and loop.time() < deadline:
            await asyncio.sleep(_POLL_S)
        left = self.engine.num_in_flight
        if left:
            logger.warning(
                "drain window of %.1f s over: failing %d requests still running", self.drain_s, left
            )
            self.engine.fail_all(
                EngineDeadError(
                    f"the server is shutting down and its drain window ({self.drain_s:g} s, "
                    "--shutdown-timeout) ended before this request finished"
                )
            )
