"""Model runner: turns a step's StepInput into tensors, runs the model, samples."""

from kestrel.runner.input_batch import InputBatch
from kestrel.runner.model_runner import ModelRunner

__all__ = ["InputBatch", "ModelRunner"]
