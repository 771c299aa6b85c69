"""Batched sampling: per-row parameters as tensors (`SamplingBatch`) and the `Sampler`."""

from kestrel.sample.batch import SamplingBatch
from kestrel.sample.processors import apply_logits_processors
from kestrel.sample.sampler import Sampler, SamplerOutput, make_generator
from kestrel.sample.topk_topp import apply_min_p_top_k_top_p

__all__ = [
    "Sampler",
    "SamplerOutput",
    "SamplingBatch",
    "apply_logits_processors",
    "apply_min_p_top_k_top_p",
    "make_generator",
]
