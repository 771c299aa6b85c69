"""POST /v1/completions: text or token-id prompts (one or a batch), `echo`, `n`, logprobs in
the legacy shape; one JSON body or server-sent `text_completion` chunks ending with `[DONE]`.
Choice `index` = prompt index * n + sample index."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from kestrel.outputs import CompletionOutput, RequestOutput
from kestrel_server.common import (
    ServerState,
    check_context,
    check_logprobs,
    check_request_limits,
    check_token_ids,
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
from kestrel_server.logprobs import completion_logprobs
from kestrel_server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)


def prompt_items(prompt: Any) -> list[str | list[int]]:
    """The request's prompts: a text, a list of texts, one token-id list, or a list of them."""
    items = [prompt] if isinstance(prompt, str) else list(prompt)
    if items and all(isinstance(t, int) for t in items):
        items = [items]  # one prompt of token ids
    if not items:
        raise bad_request("'prompt' must not be empty", param="prompt")
    return items


def parse_prompts(state: ServerState, items: list[str | list[int]]) -> list[tuple[str, list[int]]]:
    """(text, token ids) per prompt; the text of a token prompt is its decoding (for echo)."""
    tokenizer = state.engine.tokenizer
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            if tokenizer is None:
                raise bad_request(
                    "this model has no tokenizer: send the prompt as token ids", param="prompt"
                )
            ids = tokenizer.encode(item)
            text = item
        else:
            ids = list(item)
            check_token_ids(ids, state.engine.vocab_size, "prompt")
            text = tokenizer.decode(ids, skip_special_tokens=False) if tokenizer else ""
        if not ids:
            raise bad_request(f"prompt {i} is empty (0 tokens)", param="prompt")
        out.append((text, ids))
    return out


async def create_completion(body: CompletionRequest, request: Request) -> Any:
    """Admission (tokenizing, queueing every prompt) and, without streaming, the whole
    generation run under a disconnect watch: a client that leaves aborts all of its work."""
    return await unless_disconnected(request, _create_completion(body, server_state(request)))


async def _create_completion(body: CompletionRequest, state: ServerState) -> Any:
    engine = state.engine
    model = state.resolve_model(body.model)
    state.fields.check(body)
    if body.suffix:
        raise bad_request("'suffix' is not supported", param="suffix")
    if body.echo and body.logprobs is not None:
        raise bad_request(
            "echo together with logprobs is not supported (prompt logprobs are not computed)",
            param="echo",
        )
    check_logprobs(state, body.logprobs, "logprobs")
    items = prompt_items(body.prompt)
    check_request_limits(state, body, len(items))
    size = sum(len(t) if isinstance(t, str) else len(t) // 4 for t in items)
    prompts = await off_loop(size, parse_prompts, state, items)
    params = [
        sampling_params(
            engine,
            body,
            max_tokens=check_context(len(ids), body.max_tokens, engine.max_model_len),
            logprobs=body.logprobs,
        )
        for _, ids in prompts
    ]
    request_id = f"cmpl-{uuid.uuid4().hex}"
    log_request(state, request_id, [ids for _, ids in prompts], params)
    streams = await submit(engine, request_id, [ids for _, ids in prompts], params)
    echoes = [text if body.echo else "" for text, _ in prompts]
    n = params[0].n
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        events = _CompletionEvents(state, request_id, model, n, body.logprobs, echoes)
        return event_stream_response(
            streams, lambda: events.run(merged_outputs(streams, state.metrics), include_usage)
        )
    finals = await final_outputs(streams, state.metrics)
    choices = []
    for p, final in enumerate(finals):
        for c in final.outputs:
            logprobs = None
            if body.logprobs is not None:
                logprobs = _logprobs(state, c, c.token_ids, 0, body.logprobs, len(echoes[p]))
            choices.append(
                CompletionChoice(
                    index=p * n + c.index,
                    text=echoes[p] + c.text,
                    logprobs=logprobs,
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                )
            )
    return CompletionResponse(id=request_id, model=model, choices=choices, usage=usage(finals))


def _logprobs(
    state: ServerState, c: CompletionOutput, ids: list[int], start: int, top_k: int, offset: int
) -> CompletionLogprobs:
    tokenizer = state.engine.tokenizer

    def text(token_id: int) -> str:
        return tokenizer.decode([token_id], skip_special_tokens=False) if tokenizer else ""

    entries = (c.logprobs or [])[start : start + len(ids)]
    return completion_logprobs(ids, entries, top_k, text, offset)


class _CompletionEvents:
    """Turns the outputs of a request's prompts into `text_completion` chunks."""

    def __init__(
        self,
        state: ServerState,
        request_id: str,
        model: str,
        n: int,
        top_k: int | None,
        echoes: list[str],
    ) -> None:
        self.state = state
        self.request_id = request_id
        self.model = model
        self.n = n
        self.top_k = top_k
        self.echoes = echoes
        self.created = int(time.time())
        num_choices = n * len(echoes)
        self.sent_tokens = [0] * num_choices
        self.sent_chars = [0] * num_choices
        self.echoed = [False] * num_choices

    def _chunk(self, choices: list[CompletionChoice], usage_info: Any = None) -> str:
        body = CompletionResponse(
            id=self.request_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=usage_info,
        )
        return sse(body.model_dump_json())

    async def run(
        self, outputs: AsyncIterator[tuple[int, RequestOutput]], include_usage: bool
    ) -> AsyncIterator[str]:
        finals: dict[int, RequestOutput] = {}
        async for p, output in outputs:
            choices = [self._choice(p, c) for c in output.outputs]
            choices = [c for c in choices if c is not None]
            if choices:
                yield self._chunk(choices)
            if output.finished:
                finals[p] = output
        if include_usage:
            yield self._chunk([], usage([finals[p] for p in sorted(finals)]))

    def _choice(self, p: int, c: CompletionOutput) -> CompletionChoice | None:
        index = p * self.n + c.index
        prefix = ""
        if not self.echoed[index]:
            self.echoed[index] = True
            prefix = self.echoes[p]
        new_ids = c.token_ids_delta
        text = prefix + c.text_delta
        if not text and not new_ids:
            return None
        logprobs = None
        if self.top_k is not None:
            start = self.sent_tokens[index]
            offset = self.sent_chars[index] + len(prefix)
            logprobs = _logprobs(self.state, c, new_ids, start, self.top_k, offset)
        self.sent_tokens[index] += len(new_ids)
        self.sent_chars[index] += len(text)
        return CompletionChoice(
            index=index,
            text=text,
            logprobs=logprobs,
            finish_reason=c.finish_reason,
            stop_reason=c.stop_reason,
        )
