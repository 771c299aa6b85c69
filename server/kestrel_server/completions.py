"""POST /v1/completions: text or token-id prompts (one or a batch), `echo`, `n`, logprobs in
the legacy shape; one JSON body or server-sent `text_completion` chunks ending with `[DONE]`.
Choice `index` = prompt index * n + sample index.

`echo` with `logprobs` puts the prompt's tokens first in `logprobs` (the first with a null
logprob, as OpenAI's legacy completions do); `max_tokens: 0` with `echo` scores the prompt and
generates nothing (the engine runs one token, which is dropped). vLLM's `prompt_logprobs` extra
comes back per choice, in vLLM's shape (in the first chunk when streaming)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from fastapi import Request

from kestrel.outputs import CompletionOutput, RequestOutput
from kestrel_server.common import (
    ServerState,
    check_constraint,
    check_context,
    check_logprobs,
    check_request_limits,
    check_token_ids,
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
from kestrel_server.errors import bad_request
from kestrel_server.logprobs import (
    completion_logprobs,
    echo_logprobs,
    join_logprobs,
    vllm_prompt_logprobs,
)
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
    score_only = body.max_tokens == 0
    if score_only and not body.echo:
        raise bad_request(
            "max_tokens = 0 is only allowed with echo = true (the prompt is scored, nothing is "
            "generated); allowed otherwise: an int >= 1",
            param="max_tokens",
        )
    check_logprobs(state, body.logprobs, "logprobs")
    items = prompt_items(body.prompt)
    check_request_limits(state, body, len(items))
    size = sum(len(t) if isinstance(t, str) else len(t) // 4 for t in items)
    prompts = await off_loop(size, parse_prompts, state, items)
    echo_k = body.logprobs if body.echo else None
    shown = _Shown(body.prompt_logprobs, echo_k, score_only)
    params = [
        sampling_params(
            engine,
            body,
            max_tokens=check_context(len(ids), 1 if score_only else body.max_tokens,
                                     engine.max_model_len),
            logprobs=None if score_only else body.logprobs,
        ).clone(prompt_logprobs=shown.engine_prompt_logprobs)
        for _, ids in prompts
    ]  # fmt: skip
    await check_constraint(state, params[0], constraint_field(body))  # the same for every prompt
    request_id = f"cmpl-{uuid.uuid4().hex}"
    log_request(state, request_id, [ids for _, ids in prompts], params)
    streams = await submit(engine, request_id, [ids for _, ids in prompts], params)
    echoes = [text if body.echo else "" for text, _ in prompts]
    n = params[0].n
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        events = _CompletionEvents(state, request_id, model, n, body.logprobs, echoes, shown)
        return event_stream_response(
            streams, lambda: events.run(merged_outputs(streams, state.metrics), include_usage)
        )
    finals = await final_outputs(streams, state.metrics)
    choices = []
    for p, final in enumerate(finals):
        for c in final.outputs:
            c = shown.completion(c)
            logprobs = None
            if body.logprobs is not None:
                logprobs = _logprobs(state, c, c.token_ids, 0, body.logprobs, len(echoes[p]))
                if echo_k is not None:
                    logprobs = join_logprobs(_echo_logprobs(state, final, echo_k), logprobs)
            choices.append(
                CompletionChoice(
                    index=p * n + c.index,
                    text=echoes[p] + c.text,
                    logprobs=logprobs,
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                    prompt_logprobs=shown.vllm(state, final),
                )
            )
    return CompletionResponse(
        id=request_id, model=model, choices=choices, usage=usage(shown.usage(finals))
    )


@dataclass(frozen=True)
class _Shown:
    """What a completions request shows of the prompt: vLLM's `prompt_logprobs` (top-k of
    `vllm_k`), the echoed prompt's logprobs (top-k of `echo_k`), and with `score_only`
    (max_tokens 0) no generated token."""

    vllm_k: int | None
    echo_k: int | None
    score_only: bool

    @property
    def engine_prompt_logprobs(self) -> int | None:
        asked = [k for k in (self.vllm_k, self.echo_k) if k is not None]
        return max(asked) if asked else None

    def completion(self, c: CompletionOutput) -> CompletionOutput:
        """`c` less its generated token when nothing was to be generated."""
        if not self.score_only:
            return c
        return replace(c, text="", token_ids=[], logprobs=None, text_delta="", token_ids_delta=[])

    def vllm(self, state: ServerState, output: RequestOutput) -> Any:
        if self.vllm_k is None or output.prompt_logprobs is None:
            return None
        return vllm_prompt_logprobs(
            output.prompt_token_ids, output.prompt_logprobs, self.vllm_k, _token_text(state)
        )

    def usage(self, finals: list[RequestOutput]) -> list[RequestOutput]:
        if not self.score_only:
            return finals
        return [replace(f, outputs=[self.completion(c) for c in f.outputs]) for f in finals]


def _token_text(state: ServerState):
    tokenizer = state.engine.tokenizer

    def text(token_id: int) -> str:
        return tokenizer.decode([token_id], skip_special_tokens=False) if tokenizer else ""

    return text


def _echo_logprobs(state: ServerState, output: RequestOutput, top_k: int) -> CompletionLogprobs:
    entries = output.prompt_logprobs or [None] * len(output.prompt_token_ids)
    return echo_logprobs(output.prompt_token_ids, entries, top_k, _token_text(state))


def _logprobs(
    state: ServerState, c: CompletionOutput, ids: list[int], start: int, top_k: int, offset: int
) -> CompletionLogprobs:
    entries = (c.logprobs or [])[start : start + len(ids)]
    return completion_logprobs(ids, entries, top_k, _token_text(state), offset)


@dataclass(slots=True)
class PlainChoice:
    """A streamed choice without logprobs or prompt logprobs (see `_plain_chunk`)."""

    index: int
    text: str
    finish_reason: str | None
    stop_reason: int | str | None

    def model(self) -> CompletionChoice:
        return CompletionChoice(
            index=self.index,
            text=self.text,
            logprobs=None,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            prompt_logprobs=None,
        )


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
        shown: _Shown,
    ) -> None:
        self.state = state
        self.request_id = request_id
        self.model = model
        self.n = n
        self.top_k = top_k
        self.echoes = echoes
        self.shown = shown
        self.created = int(time.time())
        num_choices = n * len(echoes)
        self.sent_tokens = [0] * num_choices
        self.sent_chars = [0] * num_choices
        self.echoed = [False] * num_choices
        self.finish_sent = [False] * num_choices
        self.held_text = [""] * num_choices  # deltas of a sample that ran ahead of the scoring
        self.held_ids: list[list[int]] = [[] for _ in range(num_choices)]
        self._head: str | None = None  # the plain chunks' JSON up to their choices

    def _chunk(self, choices: list[CompletionChoice], usage_info: Any = None) -> str:
        body = CompletionResponse(
            id=self.request_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=usage_info,
        )
        return sse(body.model_dump_json())

    def _plain_chunk(self, choices: list[PlainChoice]) -> str:
        """The chunk `_chunk` makes for choices without logprobs or prompt logprobs (and no
        usage), byte for byte, without building response models: most chunks of a stream.
        `tests/server/test_plain_chunks.py` holds the two to the same output."""
        if self._head is None:
            self._head = chunk_head("text_completion", self.request_id, self.created, self.model)
        parts = [
            f'{{"index":{c.index},"text":{json_str(c.text)},"logprobs":null,'
            f'"finish_reason":{json_str(c.finish_reason)},'
            f'"stop_reason":{json_str(c.stop_reason)},"prompt_logprobs":null}}'
            for c in choices
        ]
        return sse(self._head + ",".join(parts) + '],"usage":null}')

    async def run(
        self, outputs: AsyncIterator[tuple[int, RequestOutput]], include_usage: bool
    ) -> AsyncIterator[str]:
        finals: dict[int, RequestOutput] = {}
        async for p, output in outputs:
            chunk = self.chunk_for(p, output)
            if chunk is not None:
                yield chunk
            if output.finished:
                finals[p] = output
        if include_usage:
            yield self._chunk([], usage(self.shown.usage([finals[p] for p in sorted(finals)])))

    def chunk_for(self, p: int, output: RequestOutput) -> str | None:
        """The SSE chunk of prompt p's new output (None when it shows nothing new)."""
        choices = [self._choice(p, output, c) for c in output.outputs]
        choices = [c for c in choices if c is not None]
        if not choices:
            return None
        if all(type(c) is PlainChoice for c in choices):
            return self._plain_chunk(choices)
        return self._chunk([c.model() if type(c) is PlainChoice else c for c in choices])

    def _choice(
        self, p: int, output: RequestOutput, c: CompletionOutput
    ) -> CompletionChoice | PlainChoice | None:
        """A choice's chunk. Its first one carries the echoed prompt (with the prompt's
        logprobs, which come with the first generated token) and vLLM's prompt_logprobs."""
        index = p * self.n + c.index
        c = self.shown.completion(c)
        first = not self.echoed[index]
        prefix = ""
        if first:
            if self.shown.engine_prompt_logprobs is not None and output.prompt_logprobs is None:
                # The prompt is not scored yet (sample 0 is; another sample may run ahead of
                # it after a preemption): hold this sample's deltas until it is.
                self.held_text[index] += c.text_delta
                self.held_ids[index] += c.token_ids_delta
                return None
            self.echoed[index] = True
            prefix = self.echoes[p] + self.held_text[index]
        new_ids = self.held_ids[index] + c.token_ids_delta if first else c.token_ids_delta
        text = prefix + c.text_delta
        # Nothing new? A first chunk may still carry prompt logprobs, and with max_tokens 0 a
        # finish not yet sent needs its chunk.
        carries = first and self.shown.engine_prompt_logprobs is not None
        finish_due = (
            self.shown.score_only and c.finish_reason is not None and not self.finish_sent[index]
        )
        if not text and not new_ids and not carries and not finish_due:
            return None
        self.finish_sent[index] = c.finish_reason is not None
        logprobs = None
        if self.top_k is not None:
            start = self.sent_tokens[index]
            offset = self.sent_chars[index] + (len(self.echoes[p]) if first else 0)
            logprobs = _logprobs(self.state, c, new_ids, start, self.top_k, offset)
            if first and self.shown.echo_k is not None:
                logprobs = join_logprobs(
                    _echo_logprobs(self.state, output, self.shown.echo_k), logprobs
                )
        self.sent_tokens[index] += len(new_ids)
        self.sent_chars[index] += len(text)
        if logprobs is None and not (first and self.shown.engine_prompt_logprobs is not None):
            return PlainChoice(index, text, c.finish_reason, c.stop_reason)
        return CompletionChoice(
            index=index,
            text=text,
            logprobs=logprobs,
            finish_reason=c.finish_reason,
            stop_reason=c.stop_reason,
            prompt_logprobs=self.shown.vllm(self.state, output) if first else None,
        )
