"""POST /v1/chat/completions: render the chat template, generate, answer in OpenAI's shape
(one JSON body, or server-sent `chat.completion.chunk` events ending with `[DONE]`)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from kestrel.outputs import CompletionOutput, RequestOutput
from kestrel.tokenizer.chat_template import ChatTemplateError
from kestrel_server.chat_output import (
    ChoiceParser,
    OutputParsing,
    finish_reason_with_tools,
    is_empty,
)
from kestrel_server.common import (
    ServerState,
    check_constraint,
    check_context,
    check_logprobs,
    check_request_limits,
    chunk_head,
    constraint_field,
    event_stream_response,
    final_outputs,
    json_str,
    log_request,
    merged_outputs,
    off_loop,
    sampling_params,
    server_state,
    sse,
    submit,
    unless_disconnected,
    usage,
)
from kestrel_server.errors import APIError, bad_request
from kestrel_server.logprobs import chat_logprobs, vllm_prompt_logprobs
from kestrel_server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatTool,
    DeltaMessage,
    ToolCallParam,
)
from kestrel_server.tool_choice import ToolPlan, plan_tools

# Arguments of the renderer itself: a chat_template_kwargs key may not replace them.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "self",
        "messages",
        "add_generation_prompt",
        "continue_final_message",
        "chat_template",
        "tokenize",
        "template",
        "template_source",
        "variables",
    }
)


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template expects them: text content only (parts are joined);
    assistant tool calls with their arguments as objects (Qwen2.5's and Llama 3.1's templates
    apply `tojson` to them, Qwen3's and Mistral's accept either), tool results with their
    `tool_call_id`."""
    if not messages:
        raise bad_request("'messages' must hold at least one message", param="messages")
    out = []
    for message in messages:
        content = message.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        entry: dict[str, Any] = {"role": message.role, "content": content or ""}
        if message.name is not None:
            entry["name"] = message.name
        if message.tool_calls is not None:
            entry["tool_calls"] = [_tool_call_dict(call) for call in message.tool_calls]
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        if message.reasoning_content is not None:
            entry["reasoning_content"] = message.reasoning_content
        out.append(entry)
    return out


def _tool_call_dict(call: ToolCallParam) -> dict[str, Any]:
    arguments: Any = call.function.arguments
    try:
        parsed = json.loads(arguments)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        arguments = parsed  # else the text as sent: the template decides what to do with it
    return {
        "id": call.id,
        "type": call.type,
        "function": {"name": call.function.name, "arguments": arguments},
    }


def tool_dicts(tools: list[ChatTool] | None) -> list[dict[str, Any]] | None:
    """Tools as chat templates read them: `{"type": "function", "function": {...}}`."""
    if tools is None:
        return None
    return [tool.model_dump(exclude_none=True) for tool in tools]


def check_template_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """chat_template_kwargs: no key may collide with the renderer's own arguments; `tools` and
    `documents` (passed on to the template) must be lists of objects."""
    kwargs = dict(kwargs or {})
    reserved = sorted(RESERVED_TEMPLATE_KWARGS.intersection(kwargs))
    if reserved:
        raise bad_request(
            f"chat_template_kwargs may not set {', '.join(map(repr, reserved))}: these are the "
            "renderer's own arguments (use the request's fields instead)",
            param="chat_template_kwargs",
        )
    for key in ("tools", "documents"):
        value = kwargs.get(key)
        if value is not None and (
            not isinstance(value, list) or not all(isinstance(v, dict) for v in value)
        ):
            raise bad_request(
                f"chat_template_kwargs.{key} must be a list of objects, got {type(value).__name__}"
                + (" holding other values" if isinstance(value, list) else ""),
                param=f"chat_template_kwargs.{key}",
            )
    return kwargs


def message_chars(messages: list[ChatMessage]) -> int:
    """Characters of text in the messages (to decide whether to render off the event loop)."""
    total = 0
    for message in messages:
        content = message.content
        if isinstance(content, str):
            total += len(content)
        elif content is not None:
            total += sum(len(part.text) for part in content)
    return total


def render_prompt(
    state: ServerState,
    messages: list[ChatMessage],
    *,
    add_generation_prompt: bool,
    continue_final_message: bool = False,
    template_kwargs: dict[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """Token ids of the rendered chat. Any failure of the template on this input is a 400."""
    tokenizer = state.engine.tokenizer
    if tokenizer is None:
        raise bad_request("this model has no tokenizer, so chat messages cannot be rendered")
    if add_generation_prompt and continue_final_message:
        raise bad_request(
            "add_generation_prompt and continue_final_message cannot both be true",
            param="continue_final_message",
        )
    kwargs = check_template_kwargs(template_kwargs)
    if tools is not None:
        kwargs["tools"] = tools  # the request's own field wins over chat_template_kwargs.tools
    try:
        return tokenizer.render_chat_prompt_ids(
            message_dicts(messages),
            add_generation_prompt=add_generation_prompt,
            chat_template=state.chat_template,
            continue_final_message=continue_final_message,
            **kwargs,
        )
    except ChatTemplateError as exc:
        raise bad_request(f"the chat template failed: {exc}", param="messages") from exc
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError) as exc:
        # A template (or a special-token override) that cannot render this input.
        raise bad_request(
            f"the chat template failed on these messages: {type(exc).__name__}: {exc}",
            param="messages",
        ) from exc


async def render_prompt_off_loop(
    state: ServerState, messages: list[ChatMessage], **kw
) -> list[int]:
    return await off_loop(message_chars(messages), render_prompt, state, messages, **kw)


async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Any:
    """Admission (rendering, queueing) and, without streaming, the whole generation run under a
    disconnect watch: a client that leaves aborts all of its work."""
    return await unless_disconnected(request, _create_chat_completion(body, server_state(request)))


async def _create_chat_completion(body: ChatCompletionRequest, state: ServerState) -> Any:
    engine = state.engine
    model = state.resolve_model(body.model)
    state.fields.check(body)
    check_request_limits(state, body, 1)
    top_logprobs = body.top_logprobs
    if top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs requires logprobs=true", param="top_logprobs")
    plan = plan_tools(body, state.tools)  # before rendering: a bad choice fails fast
    check_logprobs(state, top_logprobs, "top_logprobs")
    prompt_ids = await render_prompt_off_loop(
        state,
        body.messages,
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
        template_kwargs=body.chat_template_kwargs,
        tools=tool_dicts(body.tools),
    )
    requested = body.max_completion_tokens
    if requested is None:
        requested = body.max_tokens
    max_tokens = check_context(len(prompt_ids), requested, engine.max_model_len)
    params = sampling_params(
        engine, body, max_tokens=max_tokens, logprobs=(top_logprobs or 0) if body.logprobs else None
    )
    params = _with_tool_plan(params, plan, body)
    by_tools = plan.structured_outputs is not None
    await check_constraint(state, params, "tool_choice" if by_tools else constraint_field(body))
    parsing = OutputParsing(state.reasoning_parser, plan.new_parser)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    log_request(state, request_id, [prompt_ids], [params])
    streams = await _submit(engine, request_id, prompt_ids, params, plan)
    top_k = top_logprobs or 0
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        events = _ChatEvents(
            state, request_id, model, params.n, top_k, include_usage, parsing, body.prompt_logprobs
        )
        return event_stream_response(
            streams, lambda: events.run(merged_outputs(streams, state.metrics))
        )
    finals = await final_outputs(streams, state.metrics)
    final = finals[0]
    choices = []
    for c in final.outputs:
        if parsing.active:
            message = parsing.choice().message(c.text)
        else:
            message = AssistantMessage(content=c.text)
        choices.append(
            ChatChoice(
                index=c.index,
                message=message,
                logprobs=_logprobs(state, c.token_ids, c, top_k) if body.logprobs else None,
                finish_reason=finish_reason_with_tools(c.finish_reason, bool(message.tool_calls)),
                stop_reason=c.stop_reason,
            )
        )
    return ChatCompletionResponse(
        id=request_id,
        model=model,
        choices=choices,
        usage=usage(finals),
        prompt_logprobs=_prompt_logprobs(state, final, body.prompt_logprobs),
    )


def _prompt_logprobs(state: ServerState, output: RequestOutput, top_k: int | None) -> Any:
    """vLLM's `prompt_logprobs` of the rendered prompt, when asked (None until computed)."""
    if top_k is None or output.prompt_logprobs is None:
        return None
    return vllm_prompt_logprobs(
        output.prompt_token_ids, output.prompt_logprobs, top_k, _token_text(state)
    )


async def _submit(engine: Any, request_id: str, prompt_ids: list[int], params: Any, plan: ToolPlan):
    """submit(); the engine's refusal of the structured outputs that tool_choice asked for is
    reported against tool_choice (the client never sent structured_outputs)."""
    try:
        return await submit(engine, request_id, [prompt_ids], [params])
    except APIError as exc:
        if plan.structured_outputs is None or exc.param != "structured_outputs":
            raise
        raise bad_request(
            f'tool_choice "required" or a named function is enforced with structured outputs, '
            f"which failed: {exc.message}",
            param="tool_choice",
        ) from exc


def _with_tool_plan(params: Any, plan: ToolPlan, body: ChatCompletionRequest) -> Any:
    """Structured outputs for "required" and named choices; special tokens kept in the text
    when the parser's markers are special tokens (unless the client chose)."""
    changes: dict[str, Any] = {}
    if plan.structured_outputs is not None:
        if params.structured_outputs is not None:
            raise bad_request(
                'tool_choice "required" or a named function constrains the output itself; it '
                "cannot be combined with response_format or another output constraint",
                param="tool_choice",
            )
        changes["structured_outputs"] = plan.structured_outputs
    parser_class = plan.new_parser if isinstance(plan.new_parser, type) else None
    if (
        parser_class is not None
        and parser_class.needs_special_tokens
        and "skip_special_tokens" not in body.model_fields_set
    ):
        changes["skip_special_tokens"] = False
    return params.clone(**changes) if changes else params


def _logprobs(
    state: ServerState, token_ids: list[int], c: CompletionOutput, top_k: int, start: int = 0
) -> ChatLogprobs:
    entries = (c.logprobs or [])[start : start + len(token_ids)]
    return chat_logprobs(token_ids, entries, top_k, _token_text(state))


def _token_text(state: ServerState):
    tokenizer = state.engine.tokenizer

    def text(token_id: int) -> str:
        return tokenizer.decode([token_id], skip_special_tokens=False) if tokenizer else ""

    return text


@dataclass(slots=True)
class PlainDelta:
    """A streamed choice whose delta is content only, without logprobs (see `_plain_chunk`)."""

    index: int
    content: str
    finish_reason: str | None
    stop_reason: int | str | None

    def model(self) -> ChatChunkChoice:
        return ChatChunkChoice(
            index=self.index,
            delta=DeltaMessage(content=self.content),
            logprobs=None,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


class _ChatEvents:
    """Turns one request's outputs into `chat.completion.chunk` events."""

    def __init__(
        self,
        state: ServerState,
        request_id: str,
        model: str,
        n: int,
        top_k: int | None,
        include_usage: bool,
        parsing: OutputParsing | None = None,
        prompt_top_k: int | None = None,
    ) -> None:
        self.state = state
        self.request_id = request_id
        self.model = model
        self.n = n
        self.top_k = top_k
        self.include_usage = include_usage
        self.prompt_top_k = prompt_top_k  # vLLM's prompt_logprobs, sent once
        self.created = int(time.time())
        self.sent_tokens = [0] * n  # per choice: tokens already streamed (for logprob slices)
        self.finished = [False] * n  # per choice: its finish_reason was sent
        self._head: str | None = None  # the plain chunks' JSON up to their choices
        self.parsers: list[ChoiceParser] | None = None
        if parsing is not None and parsing.active:
            self.parsers = [parsing.choice() for _ in range(n)]

    def _chunk(
        self, choices: list[ChatChunkChoice], usage_info: Any = None, prompt_logprobs: Any = None
    ) -> str:
        chunk = ChatCompletionChunk(
            id=self.request_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=usage_info,
            prompt_logprobs=prompt_logprobs,
        )
        return sse(chunk.model_dump_json())

    def _plain_chunk(self, choices: list[PlainDelta]) -> str:
        """The chunk `_chunk` makes for content-only deltas (no parsers, no logprobs, no
        usage, no prompt logprobs), byte for byte, without building response models;
        `tests/server/test_plain_chunks.py` holds the two to the same output."""
        if self._head is None:
            self._head = chunk_head(
                "chat.completion.chunk", self.request_id, self.created, self.model
            )
        parts = [
            f'{{"index":{c.index},"delta":{{"role":null,"content":{json_str(c.content)}}},'
            f'"logprobs":null,"finish_reason":{json_str(c.finish_reason)},'
            f'"stop_reason":{json_str(c.stop_reason)}}}'
            for c in choices
        ]
        return sse(self._head + ",".join(parts) + '],"usage":null,"prompt_logprobs":null}')

    def chunk_for(self, output: RequestOutput) -> str | None:
        """The SSE chunk of the request's new output (None when it shows nothing new)."""
        choices = [self._choice(c) for c in output.outputs]
        choices = [c for c in choices if c is not None]
        prompt_logprobs = _prompt_logprobs(self.state, output, self.prompt_top_k)
        if prompt_logprobs is not None:
            self.prompt_top_k = None  # sent
        elif choices and all(type(c) is PlainDelta for c in choices):
            return self._plain_chunk(choices)
        if not choices and prompt_logprobs is None:
            return None
        choices = [c.model() if type(c) is PlainDelta else c for c in choices]
        return self._chunk(choices, prompt_logprobs=prompt_logprobs)

    async def run(self, outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
        yield self._chunk(
            [
                ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                for i in range(self.n)
            ]
        )
        final: RequestOutput | None = None
        async for _, output in outputs:
            chunk = self.chunk_for(output)
            if chunk is not None:
                yield chunk
            if output.finished:
                final = output
        if self.include_usage and final is not None:
            yield self._chunk([], usage([final]))

    def _choice(self, c: CompletionOutput) -> ChatChunkChoice | PlainDelta | None:
        new_ids = c.token_ids_delta
        if self.finished[c.index] or (not c.text_delta and not new_ids and not c.finish_reason):
            return None  # nothing new (e.g. a choice of n > 1 that finished earlier)
        self.finished[c.index] = c.finish_reason is not None
        logprobs = None
        if self.top_k is not None and c.logprobs is not None:
            logprobs = _logprobs(self.state, new_ids, c, self.top_k, self.sent_tokens[c.index])
        self.sent_tokens[c.index] += len(new_ids)
        finish_reason = c.finish_reason
        if self.parsers is None and logprobs is None:
            return PlainDelta(c.index, c.text_delta, finish_reason, c.stop_reason)
        if self.parsers is None:
            delta = DeltaMessage(content=c.text_delta)
        else:
            parser = self.parsers[c.index]
            delta = parser.delta(c.text_delta, final=finish_reason is not None)
            if is_empty(delta) and finish_reason is None and logprobs is None:
                return None  # held back (a marker may be arriving)
            finish_reason = finish_reason_with_tools(finish_reason, parser.called_tools)
        return ChatChunkChoice(
            index=c.index,
            delta=delta,
            logprobs=logprobs,
            finish_reason=finish_reason,
            stop_reason=c.stop_reason,
        )
