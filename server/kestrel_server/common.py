"""Plumbing shared by the chat and completions endpoints: sampling parameters from a request,
the context-length check, submitting prompts to the engine, merging their output streams,
and cancelling work when the client goes away."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from kestrel.engine.async_engine import AsyncLLMEngine, RequestStream
from kestrel.outputs import RequestOutput
from kestrel.sampling_params import MAX_LOGPROBS, SamplingParams, StructuredOutputsParams
from kestrel.structured import GrammarLimits
from kestrel_server.constraints import ConstraintChecker
from kestrel_server.errors import APIError, bad_request, from_exception
from kestrel_server.metrics import ServerMetrics
from kestrel_server.protocol import SamplingRequest, UsageInfo
from kestrel_server.reasoning_parsers import ReasoningParser
from kestrel_server.request_fields import FieldPolicy
from kestrel_server.tool_choice import ToolSettings

T = TypeVar("T")
logger = logging.getLogger(__name__)

# Request fields that map one-to-one onto SamplingParams when the client sets them.
_DIRECT_FIELDS = (
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "prompt_logprobs",
    "ignore_eos",
    "min_tokens",
    "include_stop_str_in_output",
    "skip_special_tokens",
)


# Inputs larger than this (characters, summed over a request's texts) are tokenized and rendered
# in a worker thread, so the event loop keeps serving other requests (and /health) meanwhile.
OFF_LOOP_CHARS = 16_384


@dataclass(frozen=True)
class RequestLimits:
    """Per-request bounds set by the server's flags (defaults as vLLM's effective limits)."""

    max_n: int = 16_384  # samples per prompt (vLLM: VLLM_MAX_N_SEQUENCES)
    max_prompts: int = 1024  # prompts in one completions request (VLLM_MAX_COMPLETION_PROMPTS)
    max_logprobs: int = MAX_LOGPROBS  # logprobs per token (vLLM's --max-logprobs, default 20)


@dataclass
class ServerState:
    """What the endpoints share; built once by build_app."""

    engine: AsyncLLMEngine
    served_model_names: list[str]
    metrics: ServerMetrics
    api_key: str | None = None
    chat_template: str | None = None
    limits: RequestLimits = field(default_factory=RequestLimits)
    tools: ToolSettings = field(default_factory=ToolSettings)
    reasoning_parser: type[ReasoningParser] | None = None  # --reasoning-parser
    fields: FieldPolicy = field(default_factory=FieldPolicy)  # undeclared request fields
    log_requests: bool = False
    constraints: ConstraintChecker = field(
        default_factory=lambda: ConstraintChecker(GrammarLimits())
    )
    extra: dict[str, Any] = field(default_factory=dict)

    def resolve_model(self, name: str | None) -> str:
        """The served name a request asked for (None = the first); unknown names are a 404."""
        if name is None or name == "":
            return self.served_model_names[0]
        if name not in self.served_model_names:
            shown = repr(name) if len(name) <= 200 else repr(name[:200]) + "..."
            raise APIError(
                404,
                f"the model {shown} does not exist; this server serves "
                f"{', '.join(repr(n) for n in self.served_model_names)}",
                param="model",
                code="model_not_found",
            )
        return name


def server_state(request: Request) -> ServerState:
    return request.app.state.kestrel


async def off_loop(size: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)`, in a worker thread when `size` (characters of input) is large:
    tokenizing or rendering megabytes of text must not stall the event loop."""
    if size <= OFF_LOOP_CHARS:
        return fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)


def check_request_limits(state: ServerState, req: SamplingRequest, num_prompts: int) -> None:
    """n, the prompt count and their product against the server's limits (400s naming them).
    Limits of the model (top_k, token ids) are the engine's checks, made at admission."""
    limits = state.limits
    if req.n > limits.max_n:
        raise bad_request(
            f"n = {req.n} is invalid; allowed: an int in [1, {limits.max_n}] (--max-n)", "n"
        )
    if num_prompts > limits.max_prompts:
        raise bad_request(
            f"the request holds {num_prompts} prompts; allowed: at most {limits.max_prompts} "
            "(--max-prompts)",
            "prompt",
        )
    if num_prompts * req.n > limits.max_n:
        raise bad_request(
            f"{num_prompts} prompts x n = {req.n} make {num_prompts * req.n} sequences; "
            f"allowed: at most {limits.max_n} per request (--max-n)",
            "n",
            code="request_too_large",
        )


def check_logprobs(state: ServerState, value: int | None, param: str) -> None:
    """logprobs per token against --max-logprobs (400 naming the field)."""
    limit = state.limits.max_logprobs
    if value is not None and value > limit:
        raise bad_request(
            f"{param} = {value} is invalid; allowed: an int in [0, {limit}] (--max-logprobs)",
            param,
        )


def log_request(
    state: ServerState, request_id: str, prompts: list[list[int]], params: list[SamplingParams]
) -> None:
    """With --enable-log-requests: one line per admitted request (no prompt text)."""
    if state.log_requests:
        p = params[0]
        logger.info(
            "request %s: %d prompt(s) of %s tokens, n=%d, max_tokens=%s, temperature=%s",
            request_id, len(prompts), ",".join(str(len(ids)) for ids in prompts), p.n,
            p.max_tokens, p.temperature,
        )  # fmt: skip


def sampling_params(
    engine: AsyncLLMEngine,
    req: SamplingRequest,
    *,
    max_tokens: int | None,
    logprobs: int | None,
) -> SamplingParams:
    """The model's defaults overridden by every field the client set. ValueErrors from
    SamplingParams name the field and its allowed range (-> 400)."""
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed with stream=true", "stream_options")
    overrides: dict[str, Any] = {}
    for name in _DIRECT_FIELDS:
        value = getattr(req, name)
        if value is not None and name in req.model_fields_set:
            overrides[name] = value
    overrides["max_tokens"] = max_tokens
    overrides["logprobs"] = logprobs
    constraint = structured_outputs(req)
    if constraint is not None:
        overrides["structured_outputs"] = constraint
    return engine.default_sampling_params().clone(**overrides)


def structured_outputs(req: SamplingRequest) -> StructuredOutputsParams | None:
    """The request's output constraint from whichever field set it (400 when more than one
    does, or when response_format json_schema has no schema)."""
    found = _constraints(req)
    return found[0][1] if found else None


def constraint_field(req: SamplingRequest) -> str | None:
    """The request field that set its output constraint (None: none did)."""
    found = _constraints(req)
    return found[0][0] if found else None


async def check_constraint(state: ServerState, params: SamplingParams, param: str | None) -> None:
    """The constraint of `params` (if any) validated off the event loop: a 400 naming `param`
    when it cannot be used (see constraints.py)."""
    if params.structured_outputs is not None:
        await state.constraints.check(params.structured_outputs, param or "structured_outputs")


def _constraints(req: SamplingRequest) -> list[tuple[str, StructuredOutputsParams]]:
    found: list[tuple[str, StructuredOutputsParams]] = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        found.append(("response_format", StructuredOutputsParams(json_object=True)))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise bad_request(
                "response_format of type json_schema needs json_schema.schema (a JSON schema)",
                "response_format",
            )
        found.append(("response_format", StructuredOutputsParams(json=rf.json_schema.schema_)))
    so = req.structured_outputs
    if so is not None:
        fields = {
            "json": so.json_,
            "regex": so.regex,
            "choice": so.choice,
            "grammar": so.grammar,
            "json_object": bool(so.json_object),
        }
        found.append(("structured_outputs", _constraint("structured_outputs", **fields)))
    for name, key in (
        ("guided_json", "json"),
        ("guided_regex", "regex"),
        ("guided_choice", "choice"),
        ("guided_grammar", "grammar"),
    ):
        value = getattr(req, name)
        if value is not None:
            found.append((name, _constraint(name, **{key: value})))
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise bad_request(
            f"at most one output constraint per request; this one sets {names}", found[1][0]
        )
    return found


def _constraint(param: str, **fields: Any) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**fields)
    except ValueError as exc:
        raise bad_request(str(exc), param) from exc


def check_context(prompt_len: int, max_tokens: int | None, max_model_len: int) -> int:
    """Returns the effective max_tokens (None = what is left of the context); raises a 400
    naming both lengths and the limit when prompt + completion does not fit."""
    if prompt_len >= max_model_len:
        raise bad_request(
            f"the prompt has {prompt_len} tokens, but this model's context length is "
            f"{max_model_len} tokens (the prompt must leave room for at least one new token)",
            param="messages",
            code="context_length_exceeded",
        )
    if max_tokens is None:
        return max_model_len - prompt_len
    if max_tokens < 1:
        raise bad_request(
            f"max_tokens = {max_tokens} is invalid; allowed: an int >= 1", param="max_tokens"
        )
    if prompt_len + max_tokens > max_model_len:
        raise bad_request(
            f"this model's context length is {max_model_len} tokens, but {prompt_len} prompt "
            f"tokens + {max_tokens} max_tokens = {prompt_len + max_tokens} tokens were "
            "requested; shorten the prompt or lower max_tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return max_tokens


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    if ids and not (0 <= min(ids) and max(ids) < vocab_size):
        token = next(t for t in ids if not 0 <= t < vocab_size)
        raise bad_request(
            f"{param} holds token id {token}, out of range [0, {vocab_size})", param=param
        )


async def submit(
    engine: AsyncLLMEngine, request_id: str, prompts: list[list[int]], params: list[SamplingParams]
) -> list[RequestStream]:
    """Adds one engine request per prompt (ids `request_id-i`) as one batch: all are admitted
    before the next engine step, or none is. Cancelling the caller aborts them all."""
    batch = [(f"{request_id}-{i}", prompt, p) for i, (prompt, p) in enumerate(zip(prompts, params))]
    try:
        return await engine.add_requests(batch)
    except Exception as exc:
        raise from_exception(exc) from exc


async def merged_outputs(
    streams: list[RequestStream], metrics: ServerMetrics
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from all streams as they arrive; every stream is aborted if the
    consumer stops early, and every output passes through the metrics."""
    trackers = [metrics.tracker() for _ in streams]
    try:
        if len(streams) == 1:
            async for output in streams[0]:
                trackers[0].on_output(output)
                yield 0, output
            return
        merged: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

        async def pump(index: int, stream: RequestStream) -> None:
            try:
                async for output in stream:
                    await merged.put((index, output))
            except Exception as exc:  # noqa: BLE001 - forwarded to the consumer
                await merged.put((index, exc))
            await merged.put((index, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        try:
            open_streams = len(streams)
            while open_streams:
                index, item = await merged.get()
                if item is None:
                    open_streams -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    trackers[index].on_output(item)
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()
    finally:
        for stream, tracker in zip(streams, trackers):
            if not stream.finished or stream.aborted:
                tracker.on_abort()
            stream.abort()


async def final_outputs(
    streams: list[RequestStream], metrics: ServerMetrics
) -> list[RequestOutput]:
    """The finished output of each stream, in prompt order."""
    finals: list[RequestOutput | None] = [None] * len(streams)
    async for index, output in merged_outputs(streams, metrics):
        if output.finished:
            finals[index] = output
    missing = [i for i, f in enumerate(finals) if f is None]
    if missing:
        raise APIError(503, f"prompt {missing[0]} ended without a result", code="aborted")
    return [f for f in finals if f is not None]


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Runs `work` but cancels it (aborting its engine requests, also those of a batch being
    admitted) if the client disconnects first; a disconnected client gets no response, so the
    499 below is never read."""

    async def wait_for_disconnect() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    work_task = asyncio.ensure_future(work)
    watch = asyncio.create_task(wait_for_disconnect())
    try:
        done, _ = await asyncio.wait({work_task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work_task.done():
            work_task.cancel()
    if work_task in done:
        return work_task.result()
    raise APIError(499, "the client disconnected", code="client_disconnected")


def usage(finals: list[RequestOutput]) -> UsageInfo:
    prompt = sum(len(f.prompt_token_ids) for f in finals)
    completion = sum(len(c.token_ids) for f in finals for c in f.outputs)
    return UsageInfo(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


# Characters that JSON leaves raw but str.splitlines() treats as line breaks: clients that split
# an SSE stream that way would cut an event in two, so they are sent as JSON escapes.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def json_str(value: str | int | None) -> str:
    """JSON of a string, int or None as pydantic's model_dump_json writes it (UTF-8 kept): the
    pieces of the chunks the streams build without response models."""
    if value is None:
        return "null"
    if type(value) is str:
        return _encode_str(value)
    return json.dumps(value)


_encode_str = json.encoder.encode_basestring  # the C encoder json.dumps(ensure_ascii=False) uses


def chunk_head(obj: str, request_id: str, created: int, model: str) -> str:
    """A streamed chunk's JSON up to its choices, as the response models write it."""
    return (
        f'{{"id":{json_str(request_id)},"object":"{obj}","created":{created},'
        f'"model":{json_str(model)},"choices":['
    )


def sse(payload: str) -> str:
    """One server-sent event; `payload` is JSON (these characters occur only inside strings)."""
    if not payload.isascii():  # the three are not ASCII (and translate() is slow)
        payload = payload.translate(_LINE_BREAKS)
    return f"data: {payload}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def sse_stream(
    events: Callable[[], AsyncIterator[str]],
) -> AsyncIterator[str]:
    """Wraps an event generator: errors after the headers went out become an error event;
    the stream always ends with [DONE]."""
    try:
        async for event in events():
            yield event
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported to the client in the stream
        yield from_exception(exc).sse()
    yield SSE_DONE


def event_stream_response(
    streams: list[RequestStream], events: Callable[[], AsyncIterator[str]]
) -> StreamingResponse:
    """Server-sent events; the engine requests are aborted once the response ends however it
    ends (also when the client left before the first event, so the generator never ran)."""

    def abort_all() -> None:
        for stream in streams:
            stream.abort()

    return StreamingResponse(
        sse_stream(events), media_type="text/event-stream", background=BackgroundTask(abort_all)
    )


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))
