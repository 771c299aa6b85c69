"""What the engine hands back: one RequestOutput per request, with one CompletionOutput per
sample (n > 1 gives several). Streaming callers read the deltas; offline callers the totals."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = most likely; None when not computed
    decoded_token: str | None = None


# One entry per generated token: token id -> Logprob (the sampled token plus the top-k).
SampleLogprobs = list[dict[int, Logprob]]
# One entry per prompt token: None for the first (nothing predicts it), then the prompt token
# itself (its exact rank) plus the top-k (ranks 1..k).
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    # "stop" | "length" | "abort" | "error" (the request failed, see RequestOutput.error) |
    # None while running
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: SampleLogprobs | None = None
    # Since the previous RequestOutput of this request (for streaming):
    text_delta: str = ""
    token_ids_delta: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_prompt_tokens: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    # Set only when this request failed alone (its sampling or output processing raised; the
    # other requests went on): one line, "<ExceptionType>: <message> (this request's <stage>
    # failed)". Then `finished` is True and every sample that had not finished has
    # finish_reason "error".
    error: str | None = None
    # Asked for with SamplingParams.prompt_logprobs: set once the whole prompt has been
    # computed (from the output that carries the first generated token on), else None.
    prompt_logprobs: PromptLogprobs | None = None


def take_completion(sample: Any, token_ids: list[int]) -> CompletionOutput:
    """The CompletionOutput of a sample's progress so far (`sample` has index, text,
    finish_reason, stop_reason, logprobs, text_delta and num_tokens_reported), handing out its
    deltas: text_delta is cleared and num_tokens_reported moved to the end."""
    out = CompletionOutput(
        index=sample.index,
        text=sample.text,
        token_ids=list(token_ids),
        finish_reason=sample.finish_reason,
        stop_reason=sample.stop_reason,
        logprobs=None if sample.logprobs is None else list(sample.logprobs),
        text_delta=sample.text_delta,
        token_ids_delta=list(token_ids[sample.num_tokens_reported :]),
    )
    sample.text_delta = ""
    sample.num_tokens_reported = len(token_ids)
    return out
