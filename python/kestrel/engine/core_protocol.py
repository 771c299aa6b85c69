"""Messages between API server processes (front ends) and the engine core process.

Transport (ZeroMQ, see `engine/core_process.py`): every front end PUSHes requests to the
core's one PULL socket and binds a PULL socket of its own, to which the core PUSHes that front
end's outputs. Each message is one frame, msgpack-encoded by msgspec with the types below
(tagged unions, decoded straight into these structs).

Outputs are deltas: per step and request, the new token ids of each sample (and their logprobs
when asked), a finish reason once, the prompt's logprobs once (when asked, with the first
generated token), and the request's error if it failed alone. Never full token
lists, never text: detokenization, stop strings and logprob texts run in the front end.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec

from kestrel.sampling_params import SamplingParams

# ---- front end -> core ----------------------------------------------------------------------


class Register(msgspec.Struct, tag=True):
    """First message of a front end: where the core sends its outputs."""

    client: int
    output_address: str


class AddRequest(msgspec.Struct, array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    params: dict[str, Any]  # SamplingParams fields (see params_to_wire)
    arrival_time: float
    priority: int = 0


class AddBatch(msgspec.Struct, tag=True):
    """Requests admitted all or nothing, before the next step (one API request's prompts)."""

    client: int
    requests: list[AddRequest]


class Abort(msgspec.Struct, tag=True):
    client: int
    request_ids: list[str]


class FinishSample(msgspec.Struct, tag=True):
    """The front end found a stop string in sample `index`'s text: end it, free its blocks."""

    client: int
    request_id: str
    index: int


class Utility(msgspec.Struct, tag=True):
    """A call on the core answered by a UtilityResult with the same call_id (stats, health)."""

    client: int
    call_id: int
    method: str


class Shutdown(msgspec.Struct, tag=True):
    """Stop the core (sent by the process that started it)."""


CoreRequest = Register | AddBatch | Abort | FinishSample | Utility | Shutdown

# ---- core -> front end ----------------------------------------------------------------------


class Logprobs(msgspec.Struct, array_like=True):
    """The logprob entry of one generated (or prompt) token (`kestrel.outputs.Logprob`s without their
    text), in the entry's order: the top-k (ranks 1..k), and the sampled token if not among
    them."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int | None]


class SampleDelta(msgspec.Struct, array_like=True):
    index: int  # which of the request's n samples
    token_ids: list[int]  # new since the last delta
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"; set once
    stop_token: int | None = None  # the stop token id that ended it (finish "stop")
    logprobs: list[Logprobs] | None = None  # one per new token, when the request asked


class RequestDelta(msgspec.Struct, array_like=True):
    request_id: str
    samples: list[SampleDelta]
    finished: bool = False  # every sample finished: the last delta of this request
    error: str | None = None  # the request failed alone (see kestrel.engine.faults)
    # Sent in a request's first delta only (-1 / None after).
    num_cached_prompt_tokens: int = -1
    first_scheduled_time: float | None = None
    # SamplingParams.prompt_logprobs: sent once, when the whole prompt has been computed. One
    # per prompt token: None for the first, then the prompt token and the top-k (any order).
    prompt_logprobs: list[Logprobs | None] | None = None


class Reply(msgspec.Struct, array_like=True):
    """The answer to one AddRequest: accepted (kind None) or refused with an error."""

    request_id: str
    # None | "invalid" | "too_large" | "queue_full" | "type" | "other", or "batch": refused
    # because another request of its batch was (that one's reply says why).
    kind: str | None = None
    message: str = ""
    param: str | None = None


class UtilityResult(msgspec.Struct, array_like=True):
    call_id: int
    result: Any = None
    error: str | None = None


class CoreOutputs(msgspec.Struct, tag=True):
    deltas: list[RequestDelta] = []
    replies: list[Reply] = []
    utility: list[UtilityResult] = []
    stats: dict[str, Any] | None = None  # the scheduler's counters, at most every few ms
    dead: str | None = None  # the core failed and stops: every request of this client fails


class CoreFacts(msgspec.Struct):
    """What a front end needs to know about the served model, sent once at start-up."""

    model_name: str
    max_model_len: int
    vocab_size: int
    max_num_seqs: int
    default_params: dict[str, Any]
    stats: dict[str, Any]
    pid: int
    cache_config: dict[str, str] = {}  # KV-cache settings (the cache_config_info metric)
    max_grammar_chars: int = 131_072  # EngineConfig.max_grammar_chars (the API server checks it)


def params_to_wire(params: SamplingParams) -> dict[str, Any]:
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}


def params_from_wire(fields: dict[str, Any]) -> SamplingParams:
    return SamplingParams(**fields)


request_encoder = msgspec.msgpack.Encoder()
request_decoder = msgspec.msgpack.Decoder(CoreRequest)
output_encoder = msgspec.msgpack.Encoder()
output_decoder = msgspec.msgpack.Decoder(CoreOutputs)
