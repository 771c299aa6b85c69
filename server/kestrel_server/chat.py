"""POST /v1/chat/completions: render the chat template, generate, answer in OpenAI's shape
(one JSON body, or server-sent `chat.completion.chunk` events ending with `[DONE]`)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from kestrel.outputs import CompletionOutput, RequestOutput
from kestrel.tokenizer.chat_template import ChatTemplateError
from kestrel_server.common import (
    ServerState,
    check_context,
    check_logprobs,
    check_request_limits,
    event_stream_response,
    final_outputs,
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
from kestrel_server.errors import bad_request
from kestrel_server.logprobs import chat_logprobs
from kestrel_server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    DeltaMessage,
)

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
    """Messages as the chat template expects them: text content only (parts are joined)."""
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
        out.append(entry)
    return out


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
    check_logprobs(state, top_logprobs, "top_logprobs")
    prompt_ids = await render_prompt_off_loop(
        state,
        body.messages,
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
        template_kwargs=body.chat_template_kwargs,
    )
    requested = body.max_completion_tokens
    if requested is None:
        requested = body.max_tokens
    max_tokens = check_context(len(prompt_ids), requested, engine.max_model_len)
    params = sampling_params(
        engine, body, max_tokens=max_tokens, logprobs=(top_logprobs or 0) if body.logprobs else None
    )
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    log_request(state, request_id, [prompt_ids], [params])
    streams = await submit(engine, request_id, [prompt_ids], [params])
    top_k = top_logprobs or 0
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        events = _ChatEvents(state, request_id, model, params.n, top_k, include_usage)
        return event_stream_response(
            streams, lambda: events.run(merged_outputs(streams, state.metrics))
        )
    finals = await final_outputs(streams, state.metrics)
    final = finals[0]
    choices = [
        ChatChoice(
            index=c.index,
            message=AssistantMessage(content=c.text),
            logprobs=_logprobs(state, c.token_ids, c, top_k) if body.logprobs else None,
            finish_reason=c.finish_reason,
            stop_reason=c.stop_reason,
        )
        for c in final.outputs
    ]
    return ChatCompletionResponse(id=request_id, model=model, choices=choices, usage=usage(finals))


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
    ) -> None:
        self.state = state
        self.request_id = request_id
        self.model = model
        self.n = n
        self.top_k = top_k
        self.include_usage = include_usage
        self.created = int(time.time())
        self.sent_tokens = [0] * n  # per choice: tokens already streamed (for logprob slices)

    def _chunk(self, choices: list[ChatChunkChoice], usage_info: Any = None) -> str:
        chunk = ChatCompletionChunk(
            id=self.request_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=usage_info,
        )
        return sse(chunk.model_dump_json())

    async def run(self, outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
        yield self._chunk(
            [
                ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                for i in range(self.n)
            ]
        )
        final: RequestOutput | None = None
        async for _, output in outputs:
            choices = [self._choice(c) for c in output.outputs]
            choices = [c for c in choices if c is not None]
            if choices:
                yield self._chunk(choices)
            if output.finished:
                final = output
        if self.include_usage and final is not None:
            yield self._chunk([], usage([final]))

    def _choice(self, c: CompletionOutput) -> ChatChunkChoice | None:
        new_ids = c.token_ids_delta
        if not c.text_delta and not new_ids:
            return None  # nothing new (e.g. a choice of n > 1 that finished earlier)
        logprobs = None
        if self.top_k is not None and c.logprobs is not None:
            logprobs = _logprobs(self.state, new_ids, c, self.top_k, self.sent_tokens[c.index])
        self.sent_tokens[c.index] += len(new_ids)
        return ChatChunkChoice(
            index=c.index,
            delta=DeltaMessage(content=c.text_delta),
            logprobs=logprobs,
            finish_reason=c.finish_reason,
            stop_reason=c.stop_reason,
        )
