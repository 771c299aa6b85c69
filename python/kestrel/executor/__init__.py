"""Executors: how the engine runs a step on its model runner(s)."""

from kestrel.executor.step_input import StepInput
from kestrel.executor.uniproc import Executor, UniProcExecutor

__all__ = ["Executor", "StepInput", "UniProcExecutor"]
