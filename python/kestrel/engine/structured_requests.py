"""The engine's side of structured outputs: requests waiting for their grammar, the step's
bitmask for the constrained rows, and advancing each sequence's matcher by its tokens.

A constrained request waits outside the scheduler while its constraint is checked and compiled
in a worker thread (`GrammarBackend.compile_async`: the size cap, the grammar text and the
compile under `GrammarLimits`; nothing of it runs on the engine's thread, so a huge or
pathological grammar delays only its own request); `admit_ready` hands the compiled ones (and
the failures, which fail their request alone) to the engine at the start of a step. The step
loop never blocks on a compile unless nothing else can run (`wait_any`, bounded).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from kestrel.errors import InvalidRequestError
from kestrel.structured import GrammarBackend, GrammarLimits, GrammarMask, Matcher

if TYPE_CHECKING:
    from kestrel.sampling_params import SamplingParams, StructuredOutputsParams
    from kestrel.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class _Waiting:
    future: Future[Matcher]
    admit: Callable[[Matcher | None, BaseException | None], None]


class StructuredRequests:
    def __init__(
        self,
        tokenizer: Tokenizer | None,
        eos_token_id: int | None,
        limits: GrammarLimits | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._eos = eos_token_id
        self._limits = limits or GrammarLimits()
        self._backend: GrammarBackend | None = None
        self.waiting: dict[str, _Waiting] = {}

    def constraint_of(self, params: SamplingParams) -> StructuredOutputsParams | None:
        """The request's constraint (None when unconstrained), not yet checked: that is the
        compile worker's job. InvalidRequestError when the model has no tokenizer."""
        if params.structured_outputs is None:
            return None
        if self._tokenizer is None:
            raise InvalidRequestError(
                "structured_outputs", "structured outputs need the model's tokenizer; it has none"
            )
        return params.structured_outputs

    def submit(
        self,
        request_id: str,
        constraint: StructuredOutputsParams,
        admit: Callable[[Matcher | None, BaseException | None], None],
    ) -> None:
        """Checks and compiles in the background; `admit(matcher, None)` or
        `admit(None, error)` is called from `admit_ready` on the engine's thread once done."""
        if self._backend is None:
            assert self._tokenizer is not None
            self._backend = GrammarBackend(self._tokenizer, self._eos, self._limits)
        self.waiting[request_id] = _Waiting(self._backend.compile_async(constraint), admit)

    def cancel(self, request_id: str) -> None:
        waiting = self.waiting.pop(request_id, None)
        if waiting is not None:
            waiting.future.cancel()

    def admit_ready(self) -> None:
        for request_id in [r for r, w in self.waiting.items() if w.future.done()]:
            waiting = self.waiting.pop(request_id)
            try:
                matcher = waiting.future.result()
            except BaseException as exc:  # noqa: BLE001 - the request's own failure
                waiting.admit(None, exc)
            else:
                waiting.admit(matcher, None)

    def wait_any(self, timeout_s: float) -> None:
        """Blocks up to `timeout_s` for one compile to finish (only when nothing can run)."""
        if self.waiting:
            wait([w.future for w in self.waiting.values()], timeout_s, FIRST_COMPLETED)

    def step_mask(
        self, matchers: list[Matcher | None], drafts: list[list[int]] | None = None
    ) -> GrammarMask | None:
        """The bitmask rows of the step's constrained sampled rows (None when there are none),
        computed in parallel across rows. `drafts[i]`: the draft tokens sampled row i assumes
        accepted (a speculative verify row): its mask is the grammar's after them (on a copy
        of the matcher; the drafts were checked against the grammar when proposed)."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        assert self._backend is not None
        constrained: list[Matcher] = []
        last = -2  # the row of constrained[-1]
        for i in rows:
            matcher = matchers[i]
            assert matcher is not None
            if drafts is not None and drafts[i]:
                # Row i of a run assumes one draft more than row i - 1 (a run's rows are
                # consecutive and share one matcher): a copy of that row's, advanced by it.
                chained = last == i - 1 and matchers[i - 1] is matcher
                if chained and len(drafts[i - 1]) == len(drafts[i]) - 1:
                    matcher, todo = constrained[-1].copy(), drafts[i][-1:]
                else:
                    matcher, todo = matcher.copy(), drafts[i]
                for token in todo:
                    matcher.accept(token)
            constrained.append(matcher)
            last = i
        bitmask = np.empty((len(rows), constrained[0].num_words), dtype=np.int32)
        self._backend.fill_bitmasks(constrained, bitmask)  # type: ignore[arg-type]
        return GrammarMask(np.asarray(rows, dtype=np.int64), bitmask)

    @staticmethod
    def advance(matcher: Matcher, token: int, request_id: str) -> bool:
        """Advances by the sampled token; True when the sequence must end here (the grammar is
        complete, or the token was not allowed: logged, as the mask should prevent it)."""
        if not matcher.accept(token):
            logger.warning("request %s: token %d is not allowed by its grammar", request_id, token)
            return True
        return matcher.is_terminated
