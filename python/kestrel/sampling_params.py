"""Per-request sampling parameters, validated once when the request is made.

The fields and their defaults follow what users of vLLM and the OpenAI API expect. Every bad
value raises `ValueError` naming the field, the value and the allowed range, so the server can
turn it into an HTTP 400 and the engine never sees an invalid request.

After `__post_init__` the container fields are normalized:
  * `stop` is a `list[str]` (a single string becomes a one-element list, None becomes []),
  * `stop_token_ids` is a `list[int]` (None becomes []),
  * `logit_bias` is a `dict[int, float]` (None becomes {}; digit-string keys, as JSON sends
    them, become ints).
Each of them is a fresh copy, so mutating the caller's list never changes the request.

This module is pure Python (no torch), so `import kestrel.sampling_params` stays cheap.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any

from kestrel.errors import InvalidRequestError

# Temperatures below this are treated as greedy (argmax); dividing logits by them would overflow.
GREEDY_TEMPERATURE_EPS = 1e-5
# Bounds shared with the OpenAI API.
MAX_LOGPROBS = 20
PENALTY_RANGE = (-2.0, 2.0)
LOGIT_BIAS_RANGE = (-100.0, 100.0)
# torch.Generator.manual_seed accepts exactly this range.
SEED_RANGE = (-(2**63), 2**64 - 1)

# Upper bound that rejects only +inf (NaN fails every comparison anyway).
_FLOAT_MAX = sys.float_info.max

# Keys of an HF generation_config.json that map one-to-one onto fields of SamplingParams.
_GENERATION_CONFIG_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def _fail(name: str, value: Any, allowed: str) -> InvalidRequestError:
    return InvalidRequestError(
        name, f"SamplingParams.{name} = {value!r} is invalid; allowed: {allowed}"
    )


def _check_int(name: str, value: Any, lo: int | None, hi: int | None, allowed: str) -> None:
    # bool is a subclass of int but `top_k=True` is a bug, not a number.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(name, value, allowed)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _fail(name, value, allowed)


def _check_float(
    name: str, value: Any, lo: float, hi: float, allowed: str, lo_open: bool = False
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(name, value, allowed)
    # Written so that NaN fails every comparison and is rejected.
    above_lo = value > lo if lo_open else value >= lo
    if not (above_lo and value <= hi):
        raise _fail(name, value, allowed)


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise _fail(name, value, "True or False")


@dataclass
class StructuredOutputsParams:
    """A constraint on a request's output, as vLLM's `structured_outputs`: exactly one of a
    JSON schema (`json`: a dict or its JSON text), any JSON object (`json_object`), a regular
    expression, a choice among strings, or a grammar (Lark/EBNF text). The engine compiles it
    with its grammar backend and masks the tokens that would leave it; one it cannot compile
    is refused (InvalidRequestError naming `structured_outputs`)."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        name = "structured_outputs"
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise _fail(name + ".json", self.json, "a JSON schema (a dict or its JSON text)")
        for field_name in ("regex", "grammar"):
            value = getattr(self, field_name)
            if value is not None and (not isinstance(value, str) or not value):
                raise _fail(f"{name}.{field_name}", value, "a non-empty str")
        if self.choice is not None:
            ok = isinstance(self.choice, (list, tuple)) and self.choice
            if not ok or not all(isinstance(c, str) for c in self.choice):
                raise _fail(name + ".choice", self.choice, "a non-empty list of str")
            self.choice = list(self.choice)
        _check_bool(name + ".json_object", self.json_object)
        given = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise InvalidRequestError(
                name,
                f"SamplingParams.structured_outputs sets {given or 'nothing'}; allowed: exactly "
                "one of json, json_object, regex, choice, grammar",
            )

    @property
    def kind(self) -> str:
        """Which constraint: "json", "json_object", "regex", "choice" or "grammar"."""
        if self.json_object:
            return "json_object"
        return next(
            k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None
        )


@dataclass
class SamplingParams:
    """How to pick the tokens of one request (see the module docstring for normalization)."""

    n: int = 1  # number of completions for the prompt, >= 1
    temperature: float = 1.0  # >= 0; 0 (or < GREEDY_TEMPERATURE_EPS) means greedy
    top_p: float = 1.0  # (0, 1]; 1 disables nucleus sampling
    top_k: int = 0  # 0 or -1 disable; else >= 1
    min_p: float = 0.0  # [0, 1]; drop tokens with prob < min_p * max prob
    seed: int | None = None  # per-request generator seed; None = shared generator
    max_tokens: int | None = 16  # >= 1; None = up to the context limit
    min_tokens: int = 0  # [0, max_tokens]; EOS and stop_token_ids are masked until reached
    stop: str | list[str] | None = None  # stop strings, normalized to list[str]
    stop_token_ids: list[int] | None = None  # extra stop tokens, normalized to list[int]
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    repetition_penalty: float = 1.0  # > 0; 1 disables
    presence_penalty: float = 0.0  # [-2, 2]
    frequency_penalty: float = 0.0  # [-2, 2]
    logprobs: int | None = None  # [0, 20] top logprobs per token; 0 = sampled token only
    prompt_logprobs: int | None = None  # [0, 20], same meaning for prompt tokens
    logit_bias: dict[int, float] | None = field(default=None)  # token id -> [-100, 100]
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True
    # Constrain the output (JSON schema, regex, choice, grammar); a dict is converted.
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        _check_int("n", self.n, 1, None, "an int >= 1")
        _check_float(
            "temperature", self.temperature, 0.0, _FLOAT_MAX, "a finite float >= 0 (0 = greedy)"
        )
        _check_float("top_p", self.top_p, 0.0, 1.0, "a float in (0, 1]", lo_open=True)
        _check_int("top_k", self.top_k, -1, None, "0 or -1 (disabled) or an int >= 1")
        _check_float("min_p", self.min_p, 0.0, 1.0, "a float in [0, 1]")
        if self.seed is not None:
            _check_int(
                "seed",
                self.seed,
                SEED_RANGE[0],
                SEED_RANGE[1],
                f"None or an int in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]",
            )
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 1, None, "None or an int >= 1")
        hi_text = "" if self.max_tokens is None else f" and <= max_tokens ({self.max_tokens})"
        _check_int("min_tokens", self.min_tokens, 0, self.max_tokens, "an int >= 0" + hi_text)
        self.stop = self._normalize_stop(self.stop)
        self.stop_token_ids = self._normalize_token_ids(self.stop_token_ids)
        _check_bool("include_stop_str_in_output", self.include_stop_str_in_output)
        _check_bool("ignore_eos", self.ignore_eos)
        _check_float(
            "repetition_penalty",
            self.repetition_penalty,
            0.0,
            _FLOAT_MAX,
            "a finite float > 0 (1 = disabled)",
            lo_open=True,
        )
        lo, hi = PENALTY_RANGE
        for name in ("presence_penalty", "frequency_penalty"):
            _check_float(name, getattr(self, name), lo, hi, f"a float in [{lo}, {hi}]")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, 0, MAX_LOGPROBS, f"None or an int in [0, {MAX_LOGPROBS}]")
        self.logit_bias = self._normalize_logit_bias(self.logit_bias)
        _check_bool("skip_special_tokens", self.skip_special_tokens)
        _check_bool("spaces_between_special_tokens", self.spaces_between_special_tokens)
        _check_bool("detokenize", self.detokenize)
        if isinstance(self.structured_outputs, dict):
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as exc:
                raise InvalidRequestError(
                    "structured_outputs", f"structured_outputs: {exc}"
                ) from exc
        elif self.structured_outputs is not None and not isinstance(
            self.structured_outputs, StructuredOutputsParams
        ):
            raise _fail(
                "structured_outputs", self.structured_outputs, "None or StructuredOutputsParams"
            )

    @staticmethod
    def _normalize_stop(stop: Any) -> list[str]:
        allowed = "None, a non-empty str, or a list of non-empty str"
        if stop is None:
            return []
        items = [stop] if isinstance(stop, str) else stop
        if not isinstance(items, (list, tuple)):
            raise _fail("stop", stop, allowed)
        for item in items:
            if not isinstance(item, str) or item == "":
                raise _fail("stop", stop, allowed)
        return list(items)

    @staticmethod
    def _normalize_token_ids(ids: Any) -> list[int]:
        allowed = "None or a list of ints >= 0"
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple)):
            raise _fail("stop_token_ids", ids, allowed)
        for token_id in ids:
            if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
                raise _fail("stop_token_ids", ids, allowed)
        return list(ids)

    @staticmethod
    def _normalize_logit_bias(bias: Any) -> dict[int, float]:
        lo, hi = LOGIT_BIAS_RANGE
        allowed = f"None or a dict of token id (int >= 0) -> float in [{lo}, {hi}]"
        if bias is None:
            return {}
        if not isinstance(bias, dict):
            raise _fail("logit_bias", bias, allowed)
        normalized: dict[int, float] = {}
        for key, value in bias.items():
            token_id = key
            if isinstance(key, str) and key.strip().isdigit():
                token_id = int(key)  # JSON object keys are strings
            if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
                raise _fail("logit_bias", bias, allowed + f" (bad key {key!r})")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise _fail("logit_bias", bias, allowed + f" (bad value {value!r})")
            if not (lo <= value <= hi):
                raise _fail("logit_bias", bias, allowed + f" (bad value {value!r})")
            if token_id in normalized:
                raise _fail("logit_bias", bias, allowed + f" (token id {token_id} given twice)")
            normalized[token_id] = float(value)
        return normalized

    @property
    def is_greedy(self) -> bool:
        """True when the sampler takes the argmax (temperature 0, or below 1e-5)."""
        return self.temperature < GREEDY_TEMPERATURE_EPS

    def clone(self, **overrides: Any) -> SamplingParams:
        """A validated copy with `overrides` applied; lists and dicts are not shared."""
        return dataclasses.replace(self, **overrides)

    @classmethod
    def from_generation_config(cls, gen_cfg: dict[str, Any], **overrides: Any) -> SamplingParams:
        """Defaults from an HF `generation_config.json`, with explicit `overrides` on top.

        Only temperature, top_p, top_k, min_p and repetition_penalty are taken from the config
        (None values are skipped). `do_sample: false` in the config means greedy, so it sets
        temperature to 0 unless `overrides` names a temperature. A missing `do_sample` leaves the
        config's sampling values in force (as vLLM does, unlike transformers' `generate`).
        """
        if not isinstance(gen_cfg, dict):
            raise TypeError(
                f"gen_cfg must be a dict (parsed generation_config.json), got "
                f"{type(gen_cfg).__name__}"
            )
        kwargs: dict[str, Any] = {
            key: gen_cfg[key] for key in _GENERATION_CONFIG_KEYS if gen_cfg.get(key) is not None
        }
        if gen_cfg.get("do_sample") is False:
            kwargs["temperature"] = 0.0
        kwargs.update(overrides)
        return cls(**kwargs)
