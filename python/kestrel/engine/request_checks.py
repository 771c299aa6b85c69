"""Checks of a request against the model (the vocabulary), made when it is added."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from kestrel.errors import InvalidRequestError
from kestrel.sampling_params import SamplingParams

if TYPE_CHECKING:
    from kestrel.tokenizer import Tokenizer


def tokenize_prompt(tokenizer: Tokenizer | None, prompt: Any) -> tuple[str | None, list[int]]:
    """(prompt text or None, token ids) of a text prompt or a list of token ids."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("this model has no tokenizer: pass the prompt as token ids")
        return prompt, tokenizer.encode(prompt)
    if isinstance(prompt, (list, tuple, np.ndarray)):
        return None, [int(t) for t in prompt]
    raise TypeError(f"prompt must be a str or a list of token ids, got {type(prompt).__name__}")


def check_request(prompt_ids: list[int], params: SamplingParams, vocab: int) -> None:
    """Raises InvalidRequestError (naming the field) for what only the model can judge: an
    empty prompt, token ids outside the vocabulary, logprobs or top_k above its size."""
    if not prompt_ids:
        raise InvalidRequestError("prompt", "the prompt is empty")
    bad = [t for t in prompt_ids if not 0 <= t < vocab]
    if bad:
        raise InvalidRequestError(
            "prompt", f"prompt token id {bad[0]} is out of range [0, {vocab})"
        )
    for name, ids in (
        ("stop_token_ids", params.stop_token_ids),
        ("logit_bias", list(params.logit_bias or {})),
    ):
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(
                name, f"{name} holds token id {bad[0]}, out of range [0, {vocab})"
            )
    if params.logprobs is not None and params.logprobs > vocab:
        raise InvalidRequestError(
            "logprobs", f"logprobs={params.logprobs} exceeds the vocabulary size {vocab}"
        )
    if params.top_k > vocab:
        allowed = f"-1 or 0 (disabled) or 1..{vocab} (the vocabulary size)"
        raise InvalidRequestError(
            "top_k", f"top_k={params.top_k} is out of range; allowed: {allowed}"
        )
