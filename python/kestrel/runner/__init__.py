"""Model runner: turns a SchedulerOutput into tensors, runs the model, samples."""

from kestrel.runner.model_runner import ModelRunner, SampleRow

__all__ = ["ModelRunner", "SampleRow"]
