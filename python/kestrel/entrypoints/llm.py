"""The offline API: `LLM(model).generate(prompts, SamplingParams(...))` and `LLM.chat(...)`."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from tqdm.auto import tqdm

from kestrel.config import EngineConfig
from kestrel.engine import LLMEngine
from kestrel.outputs import RequestOutput
from kestrel.sampling_params import SamplingParams

Prompt = str | list[int] | dict[str, Any]
Message = dict[str, Any]


def _check_engine_args(engine_args: Mapping[str, Any]) -> None:
    """A TypeError naming every keyword that is not an EngineConfig field (`model` is LLM's
    own argument), with the allowed ones listed, before anything is loaded."""
    allowed = [f.name for f in dataclasses.fields(EngineConfig) if f.name != "model"]
    unknown = sorted(set(engine_args) - set(allowed))
    if unknown:
        raise TypeError(
            f"LLM() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
            f"allowed (EngineConfig fields): {', '.join(allowed)}"
        )


class LLM:
    """Generates for a batch of prompts through the engine's continuous batching.

    `model`: a Hugging Face model directory, a .gguf file, a Hugging Face model id, or None for
    the default model. Keyword arguments are EngineConfig fields (dtype, max_model_len, ...);
    any other is a TypeError naming it.
    """

    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        _check_engine_args(engine_args)
        self.engine = LLMEngine(EngineConfig(model=model, **engine_args))
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in the order given. A prompt is a string, a list of
        token ids, or {"prompt": str} / {"prompt_token_ids": [...]}. `sampling_params` is one
        for all prompts or one per prompt; None uses the model's generation defaults.

        Bad input (an invalid prompt or parameter) raises ValueError before anything runs. A
        request that fails while it runs (its sampling or output processing raised) does not
        raise: its RequestOutput comes back in its place with `error` set and finish_reason
        "error" on its unfinished samples, so one bad prompt does not lose the others' results.
        An engine-wide failure (the forward pass, a device error) still raises."""
        prompt_list = self._as_prompt_list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(
                    f"got {len(params_list)} SamplingParams for {len(prompt_list)} prompts"
                )
        order: dict[str, int] = {}
        try:
            for i, (prompt, params) in enumerate(zip(prompt_list, params_list)):
                request_id = f"offline-{next(self._ids)}"
                self.engine.add_request(request_id, self._unwrap(prompt), params, stream=False)
                order[request_id] = i
        except Exception:
            for request_id in order:
                self.engine.abort_request(request_id)
            raise
        return self._run(order, use_tqdm)

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        use_tqdm: bool = True,
        **template_kwargs: Any,
    ) -> list[RequestOutput]:
        """Renders each conversation with the model's chat template, then generates."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so it cannot render chat messages")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            self.tokenizer.render_chat_prompt_ids(
                list(conv),
                add_generation_prompt=add_generation_prompt,
                chat_template=chat_template,
                **template_kwargs,
            )
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    @staticmethod
    def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
        if isinstance(prompts, (str, dict)):
            return [prompts]
        prompts = list(prompts)
        if prompts and all(isinstance(t, int) for t in prompts):
            return [prompts]  # a single prompt of token ids
        return prompts

    @staticmethod
    def _unwrap(prompt: Prompt) -> str | list[int]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return prompt["prompt"]
            raise ValueError("a dict prompt needs a 'prompt' or 'prompt_token_ids' key")
        return prompt

    def _run(self, order: dict[str, int], use_tqdm: bool) -> list[RequestOutput]:
        results: list[RequestOutput | None] = [None] * len(order)
        bar = tqdm(total=len(order), desc="generating", disable=not use_tqdm or len(order) < 2)
        try:
            while any(r is None for r in results):
                for output in self.engine.step():
                    if output.finished and output.request_id in order:
                        results[order[output.request_id]] = output
                        bar.update(1)
        finally:
            bar.close()
        return [r for r in results if r is not None]
