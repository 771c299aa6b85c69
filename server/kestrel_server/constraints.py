"""Checking a request's output constraint in the API server, before it goes to the engine.

llguidance validates the constraint (size cap, grammar text, the grammar under the engine's
`GrammarLimits`) on a `GrammarThreads` thread (large stacks: a deep grammar would crash a
default-sized one; llguidance drops the GIL meanwhile), so the event loop keeps serving and the
engine's step thread never sees a constraint that cannot be used. A bad one is a 400 naming the
request field that set it (`response_format`, `structured_outputs`, `guided_json`, ...). The
engine still compiles it against the vocabulary; a failure there fails that request alone.
"""

from __future__ import annotations

import asyncio

from kestrel.errors import InvalidRequestError
from kestrel.sampling_params import StructuredOutputsParams
from kestrel.structured import GrammarLimits, GrammarThreads, check
from kestrel_server.errors import bad_request

# Constraints checked at once per API process (more wait their turn).
CHECK_THREADS = 2


class ConstraintChecker:
    def __init__(self, limits: GrammarLimits) -> None:
        self.limits = limits
        self._threads: GrammarThreads | None = None  # started on first use

    async def check(self, constraint: StructuredOutputsParams, param: str) -> None:
        """Raises a 400 naming `param` when the constraint cannot be used."""
        if self._threads is None:
            self._threads = GrammarThreads(
                CHECK_THREADS, self.limits.stack_bytes, "kestrel-api-grammar"
            )
        future = self._threads.submit(check, constraint, self.limits, param)
        try:
            await asyncio.wrap_future(future)
        except InvalidRequestError as exc:
            raise bad_request(str(exc), param=exc.param) from exc

    def shutdown(self) -> None:
        if self._threads is not None:
            self._threads.shutdown()
