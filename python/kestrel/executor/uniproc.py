"""The single-process executor: the engine's one door to the model runner(s).

`LLMEngine.step` hands each step to `executor.execute(step_input, rows)` and gets the sampled
tokens back; it never calls the runner directly for a step. A multi-process executor (one
worker per tensor-parallel rank) implements the same `Executor` protocol: broadcast the
StepInput (plain arrays, picklable) to every worker and return rank 0's StepResult.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from kestrel.executor.step_input import StepInput
    from kestrel.runner.model_runner import ModelRunner, SampleRow, StepResult


class Executor(Protocol):
    def execute(self, step: StepInput, rows: list[SampleRow]) -> StepResult: ...


class UniProcExecutor:
    """Runs every step on the one ModelRunner of this process."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def execute(self, step: StepInput, rows: list[SampleRow]) -> StepResult:
        return self.runner.execute(step, rows)
