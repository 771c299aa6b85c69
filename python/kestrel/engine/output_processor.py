"""Front-end output processing: the engine core's token deltas become RequestOutputs.

Runs in the API process (see `engine/core_client.py`): incremental detokenization, stop strings
and logprob texts, for each sample of each request. When a stop string matches, the sample ends
here at once (its text is cut, nothing after the matching token is kept or sent) and the caller
asks the core to finish it; tokens the core made before it heard of the stop are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kestrel.engine import core_protocol as cp
from kestrel.outputs import (
    CompletionOutput,
    Logprob,
    PromptLogprobs,
    RequestMetrics,
    RequestOutput,
    take_completion,
)
from kestrel.sampling_params import SamplingParams
from kestrel.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class _Sample:
    index: int
    detokenizer: IncrementalDetokenizer | None
    logprobs: list[dict[int, Logprob]] | None
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    text: str = ""
    text_delta: str = ""  # since the last output
    num_tokens_reported: int = 0  # token ids handed out in outputs so far

    def completion(self) -> CompletionOutput:
        return take_completion(self, self.token_ids)


class RequestOutputProcessor:
    """One request's outputs in the front end, built from its core deltas."""

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        tokenizer: Tokenizer | None,
        arrival_time: float,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.metrics = RequestMetrics(arrival_time)
        self._tokenizer = tokenizer
        self.samples = [self._new_sample(i) for i in range(params.n)]
        self.error: str | None = None
        self.prompt_logprobs: PromptLogprobs | None = None

    def _new_sample(self, index: int) -> _Sample:
        p = self.params
        detok = None
        if self._tokenizer is not None and p.detokenize:
            detok = IncrementalDetokenizer(
                self._tokenizer,
                self.prompt_token_ids,
                skip_special_tokens=p.skip_special_tokens,
                stop=p.stop,
                include_stop_str_in_output=p.include_stop_str_in_output,
            )
        return _Sample(index, detok, [] if p.logprobs is not None else None)

    @property
    def finished(self) -> bool:
        return self.error is not None or all(s.finish_reason is not None for s in self.samples)

    def apply(self, delta: cp.RequestDelta, now: float) -> tuple[RequestOutput | None, list[int]]:
        """Folds one delta in. Returns the output to hand out (None when nothing visible
        changed) and the samples that a stop string ended here (the core must finish them)."""
        m = self.metrics
        if delta.first_scheduled_time is not None:
            m.first_scheduled_time = delta.first_scheduled_time
        if delta.num_cached_prompt_tokens >= 0:
            m.num_cached_prompt_tokens = delta.num_cached_prompt_tokens
        stopped: list[int] = []
        changed = False
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = [
                None if lp is None else self._logprob_entry(lp) for lp in delta.prompt_logprobs
            ]
            changed = True
        for sd in delta.samples:
            if not 0 <= sd.index < len(self.samples):
                continue
            sample = self.samples[sd.index]
            if sample.finish_reason is not None:
                continue  # ended here by a stop string: later tokens are dropped
            changed = True
            if sd.token_ids and m.first_token_time is None:
                m.first_token_time = now
            if self._add_tokens(sample, sd):
                if sd.finish_reason is None:
                    stopped.append(sd.index)
                continue
            if sd.finish_reason is not None:
                if sample.detokenizer is not None and not sd.token_ids:
                    sample.text_delta += sample.detokenizer.add_tokens([], finished=True).text_delta
                    sample.text = sample.detokenizer.output_text
                sample.finish_reason = sd.finish_reason
                if sd.finish_reason == "stop" and sd.stop_token is not None:
                    sample.stop_reason = sd.stop_token
        if delta.error is not None:
            self.error = delta.error
            for sample in self.samples:
                if sample.finish_reason is None:
                    sample.finish_reason = "error"
            changed = True
        if not changed and not delta.finished:
            return None
        return self.output(now), stopped

    def _add_tokens(self, sample: _Sample, sd: cp.SampleDelta) -> bool:
        """Appends the delta's tokens one by one; True when a stop string ended the sample."""
        last = len(sd.token_ids) - 1
        for j, token in enumerate(sd.token_ids):
            sample.token_ids.append(token)
            if sample.logprobs is not None and sd.logprobs is not None and j < len(sd.logprobs):
                sample.logprobs.append(self._logprob_entry(sd.logprobs[j]))
            detok = sample.detokenizer
            if detok is None:
                continue
            step = detok.add_tokens([token], finished=j == last and sd.finish_reason is not None)
            sample.text = detok.output_text
            sample.text_delta += step.text_delta
            if step.stop_reason is not None:
                sample.stop_reason = step.stop_reason
                sample.finish_reason = "stop"
                return True
        return False

    def _logprob_entry(self, lp: cp.Logprobs) -> dict[int, Logprob]:
        return {
            tid: Logprob(value, rank, self._token_text(tid))
            for tid, value, rank in zip(lp.token_ids, lp.logprobs, lp.ranks)
        }

    def _token_text(self, token_id: int) -> str | None:
        if self._tokenizer is None:
            return None
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

    def output(self, now: float) -> RequestOutput:
        finished = self.finished
        if finished and self.metrics.finished_time is None:
            self.metrics.finished_time = now
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[s.completion() for s in self.samples],
            finished=finished,
            metrics=self.metrics,
            error=self.error,
            prompt_logprobs=self.prompt_logprobs,
        )
