"""Per-request bookkeeping of the engine: what the user asked for and what came out so far."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kestrel.outputs import (
    CompletionOutput,
    PromptLogprobs,
    RequestMetrics,
    RequestOutput,
    SampleLogprobs,
    take_completion,
)
from kestrel.sampling_params import SamplingParams
from kestrel.tokenizer import IncrementalDetokenizer

if TYPE_CHECKING:
    from kestrel.structured import Matcher


@dataclass
class SampleRow:
    """What the runner's input batch is told about one sequence when it gets a slot (see
    `executor.add_sequence`), and the engine's record of its output tokens."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None
    eos_token_ids: tuple[int, ...]
    # Its slot of the runner's input batch: set on its first sampled step (and again on the
    # first after a preemption), None while it holds none.
    slot: int | None = None


@dataclass
class SequenceState:
    """One sample (of n) of a request: one request of the native scheduler."""

    core_id: str  # id in the native scheduler
    index: int  # which of the parent's n samples
    row: SampleRow  # params, prompt and output ids, generator, input-batch slot
    detokenizer: IncrementalDetokenizer | None
    logprobs: SampleLogprobs | None
    lazy_detokenize: bool = False  # feed the detokenizer once, when the sequence finishes
    matcher: Matcher | None = None  # its grammar state (structured outputs), else None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    text: str = ""
    # Since the last RequestOutput returned for this request.
    text_delta: str = ""
    num_tokens_reported: int = 0

    def completion(self) -> CompletionOutput:
        return take_completion(self, self.row.output_token_ids)


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    stream: bool = True  # False: only the final output is reported
    seqs: list[SequenceState] = field(default_factory=list)
    error: str | None = None  # set when the request failed alone (see engine/faults.py)
    # Set once every prompt token's logprob is in (params.prompt_logprobs asked for them).
    prompt_logprobs: PromptLogprobs | None = None

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)

    def output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[s.completion() for s in self.seqs],
            finished=self.finished,
            metrics=self.metrics,
            error=self.error,
            prompt_logprobs=self.prompt_logprobs,
        )


def child_generator(
    params: SamplingParams, index: int, device: torch.device
) -> torch.Generator | None:
    """Sample `index` of a seeded request draws from its own generator (seed + index), so each
    of the n samples is reproducible on its own; unseeded requests share the engine's."""
    if params.seed is None or params.is_greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed((params.seed + index) % (2**63))
    return generator
