"""SpeculativeConfig: `--speculative-config '{"method": "ngram", ...}'`, in vLLM's words.

Methods: "ngram" (prompt lookup, no model) and "draft_model" (a smaller model with the same
tokenizer proposes by greedy decoding: `kestrel/spec/draft_runner.py`). Without "method", a
config naming a "model" means "draft_model" (vLLM's older spelling); other methods are refused
with the list of those that exist. Keys: `num_speculative_tokens` (k, drafts per step, 1..64);
ngram: `prompt_lookup_max` / `prompt_lookup_min` (the longest / shortest n-gram matched;
default 5 and 1); draft_model: `model` (a path or id, as `--model` takes),
`draft_tensor_parallel_size` (1 only). Never a slowdown: `disable_by_batch_size` (vLLM's key;
default 32, null: never) skips speculation for a step with more sequences than that in the
engine, and `min_acceptance_rate` (default 0.1, 0 disables) stops drafting for a sequence whose
recent acceptance (accepted / proposed draft tokens, a moving average) fell below it, probing
it again after `PROBE_INTERVAL` steps, backing off to `MAX_PROBE_INTERVAL` while it fails."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

METHODS = ("ngram", "draft_model")
MAX_SPECULATIVE_TOKENS = 64
_COMMON_KEYS = ("method", "num_speculative_tokens", "disable_by_batch_size", "min_acceptance_rate")
_KEYS = {
    "ngram": _COMMON_KEYS + ("prompt_lookup_max", "prompt_lookup_min"),
    "draft_model": _COMMON_KEYS + ("model", "draft_tensor_parallel_size"),
}
DEFAULT_DISABLE_BY_BATCH_SIZE = 32
DEFAULT_MIN_ACCEPTANCE_RATE = 0.1


class SpeculativeConfigError(ValueError):
    """A speculative_config EngineConfig rejects (names the bad key and what is allowed)."""


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = 5
    prompt_lookup_min: int = 1
    disable_by_batch_size: int | None = DEFAULT_DISABLE_BY_BATCH_SIZE
    min_acceptance_rate: float = DEFAULT_MIN_ACCEPTANCE_RATE
    model: str | None = None  # draft_model: the draft's path or id

    @classmethod
    def parse(cls, value: str | dict[str, Any]) -> SpeculativeConfig:
        """From a JSON object (a string) or a dict; raises SpeculativeConfigError."""
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise SpeculativeConfigError(
                    f"speculative_config is not valid JSON ({e.msg}): {value!r}"
                ) from None
        if not isinstance(value, dict):
            raise SpeculativeConfigError(
                f"speculative_config must be a JSON object, got {type(value).__name__}"
            )
        method = value.get("method")
        if method is None and "model" in value:
            method = "draft_model"  # vLLM infers the method from a draft model's presence
        if method not in METHODS:
            raise SpeculativeConfigError(
                f"speculative_config method = {method!r} is not supported; allowed: {list(METHODS)}"
            )
        unknown = sorted(set(value) - set(_KEYS[method]))
        if unknown:
            raise SpeculativeConfigError(
                f"speculative_config has unknown keys {unknown} for method {method!r}; "
                f"allowed: {list(_KEYS[method])}"
            )
        k = _int(value, "num_speculative_tokens", None, 1, MAX_SPECULATIVE_TOKENS)
        hi = _int(value, "prompt_lookup_max", 5, 1, 1024)
        lo = _int(value, "prompt_lookup_min", 1, 1, hi)
        batch: int | None = None
        if value.get("disable_by_batch_size", DEFAULT_DISABLE_BY_BATCH_SIZE) is not None:
            batch = _int(value, "disable_by_batch_size", DEFAULT_DISABLE_BY_BATCH_SIZE, 1, 1 << 20)
        rate = value.get("min_acceptance_rate", DEFAULT_MIN_ACCEPTANCE_RATE)
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1:
            raise SpeculativeConfigError(
                f"speculative_config min_acceptance_rate = {rate!r} is invalid; allowed: a "
                "number in [0, 1]"
            )
        model = None
        if method == "draft_model":
            model = value.get("model")
            if not isinstance(model, str) or not model:
                raise SpeculativeConfigError(
                    f"speculative_config model = {model!r} is invalid; allowed: the draft "
                    "model's path or id (a non-empty string; method 'draft_model' needs one)"
                )
            _int(value, "draft_tensor_parallel_size", 1, 1, 1)
        return cls(method, k, hi, lo, batch, float(rate), model)


def _int(value: dict[str, Any], key: str, default: int | None, lo: int, hi: int) -> int:
    v = value.get(key, default)
    if v is None:
        raise SpeculativeConfigError(f"speculative_config needs {key!r} (an int in [{lo}, {hi}])")
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise SpeculativeConfigError(
            f"speculative_config {key} = {v!r} is invalid; allowed: an int in [{lo}, {hi}]"
        )
    return v
