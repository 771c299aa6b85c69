"""A launched step whose sampled tokens are still on their way to the host.

`ModelRunner.launch` enqueues a step's forward pass and sampling on the device and returns a
`StepFuture` at once: the sampled ids (and logprob tensors, when a row asked for them) are copied
into page-locked host memory with non-blocking copies, followed by an event. `result()` waits for
that event only, so a later step already enqueued behind it keeps the device busy while the host
reads this one's tokens (overlap scheduling, see `LLMEngine`). On CPU everything is done by the
time `launch` returns.

`sampled_on_device` stays on the device: the next step's placeholder rows (tokens the scheduler
has not seen yet) are gathered from it there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kestrel.runner.prompt_logprobs import PromptLogprobsOut
from kestrel.sample import SamplerOutput


@dataclass
class StepResult:
    sampled_token_ids: np.ndarray  # [S] int64, host; a placeholder 0 at each failed row
    # Logprob tensors (host copies), None when S == 0 or no row asked for logprobs.
    sampler_output: SamplerOutput | None
    # Row index -> the exception that sampling that row alone raised. The engine must fail those
    # rows' requests (abort them before update(), which then drops their placeholder tokens).
    failed_rows: dict[int, BaseException] = field(default_factory=dict)
    # The scored prompt rows of the step (see runner/prompt_logprobs.py), None when none asked.
    prompt_logprobs: PromptLogprobsOut | None = None


def _to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


class StepFuture:
    def __init__(
        self,
        sampled: torch.Tensor,  # [S] int64 on the step's device
        sampler_output: SamplerOutput | None = None,
        failed_rows: dict[int, BaseException] | None = None,
        prompt_logprobs: PromptLogprobsOut | None = None,
    ) -> None:
        self.sampled_on_device = sampled
        self._host = _to_host(sampled)
        self._sampler_output = None
        if sampler_output is not None:
            self._sampler_output = SamplerOutput(
                sampled_token_ids=self._host,
                logprobs=_to_host(sampler_output.logprobs),
                top_logprob_ids=_to_host(sampler_output.top_logprob_ids),
                top_logprobs=_to_host(sampler_output.top_logprobs),
            )
        self.failed_rows = failed_rows or {}  # known at launch (sampling ran on the host)
        self._prompt_logprobs = prompt_logprobs
        self._event: torch.cuda.Event | None = None
        if sampled.device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record()

    @classmethod
    def empty(cls, device: torch.device, prompt_logprobs: PromptLogprobsOut | None = None):
        return cls(torch.zeros(0, dtype=torch.int64, device=device), None, None, prompt_logprobs)

    def done(self) -> bool:
        return self._event is None or self._event.query()

    def result(self) -> StepResult:
        """Waits for this step's copies (not for steps enqueued after it)."""
        if self._event is not None:
            self._event.synchronize()
        return StepResult(
            self._host.numpy().copy(),
            self._sampler_output,
            self.failed_rows,
            self._prompt_logprobs,
        )
