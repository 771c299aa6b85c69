"""The single-process executor: the engine's one door to the model runner(s).

`LLMEngine.step` hands each step to `executor.launch(step_input, slots)` and gets a future of
the sampled tokens back (`execute` = launch and wait); it never calls the runner directly for a
step. Sampling state lives in the runner's
persistent input batch, one slot per running sequence; the engine keeps it current through
`add_sequence` (a sequence's first sampled step, or its first after a preemption),
`remove_sequence` (finished, aborted, failed or preempted) and `append_tokens` (once per step,
the tokens the scheduler accepted), and names a step's sampled rows by their slots.

A multi-process executor (one worker per tensor-parallel rank) implements the same `Executor`
protocol: broadcast the StepInput and the slots (plain arrays and ints, picklable) to every
worker and return rank 0's StepResult, and mirror add / remove / append to every worker in the
same order, so that every worker's free-slot stack hands out the same slots. (A seeded
sequence's generator would then be made in the worker from its seed; here it is passed as is.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Callable, Hashable, Sequence

    import numpy as np
    import torch

    from kestrel.executor.step_input import StepInput
    from kestrel.runner.model_runner import ModelRunner, StepFuture, StepResult
    from kestrel.runner.prompt_logprobs import PromptLogprobRows
    from kestrel.sampling_params import SamplingParams
    from kestrel.structured import GrammarMask


class Executor(Protocol):
    def add_sequence(
        self,
        key: Hashable,
        params: SamplingParams,
        prompt_ids: Sequence[int],
        generator: torch.Generator | None,
        eos_token_ids: Sequence[int],
        output_ids: Sequence[int] = (),
    ) -> int: ...

    def remove_sequence(self, key: Hashable) -> int: ...

    def append_tokens(self, slots: Sequence[int] | np.ndarray, tokens: np.ndarray) -> None: ...

    def execute(
        self,
        step: StepInput,
        slots: Sequence[int],
        prompt_rows: PromptLogprobRows | None = None,
        grammar_mask: GrammarMask | None = None,
    ) -> StepResult: ...

    def launch(
        self,
        step: StepInput,
        slots: Sequence[int],
        prompt_rows: PromptLogprobRows | None = None,
        grammar_mask: GrammarMask | Callable[[], GrammarMask | None] | None = None,
    ) -> StepFuture: ...


class UniProcExecutor:
    """Runs every step on the one ModelRunner of this process."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def add_sequence(
        self,
        key: Hashable,
        params: SamplingParams,
        prompt_ids: Sequence[int],
        generator: torch.Generator | None,
        eos_token_ids: Sequence[int],
        output_ids: Sequence[int] = (),
    ) -> int:
        """Gives sequence `key` a slot of the runner's input batch; returns the slot."""
        return self.runner.add_sequence(
            key, params, prompt_ids, generator, eos_token_ids, output_ids
        )

    def remove_sequence(self, key: Hashable) -> int:
        return self.runner.remove_sequence(key)

    def append_tokens(self, slots: Sequence[int] | np.ndarray, tokens: np.ndarray) -> None:
        self.runner.append_tokens(slots, tokens)

    def execute(
        self,
        step: StepInput,
        slots: Sequence[int],
        prompt_rows: PromptLogprobRows | None = None,
        grammar_mask: GrammarMask | None = None,
    ) -> StepResult:
        return self.runner.execute(step, slots, prompt_rows, grammar_mask)

    def launch(
        self,
        step: StepInput,
        slots: Sequence[int],
        prompt_rows: PromptLogprobRows | None = None,
        grammar_mask: GrammarMask | Callable[[], GrammarMask | None] | None = None,
    ) -> StepFuture:
        """Enqueues the step and returns at once; `result()` waits for its tokens."""
        return self.runner.launch(step, slots, prompt_rows, grammar_mask)
