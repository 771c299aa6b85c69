"""CompletionOutput.logprobs (one dict per generated token: token id -> Logprob) in OpenAI's
two shapes: chat (`content: [{token, logprob, bytes, top_logprobs}]`) and legacy completions
(`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kestrel.outputs import Logprob
from kestrel_server.protocol import (
    ChatLogprobs,
    CompletionLogprobs,
    PromptLogprob,
    PromptLogprobList,
    TokenLogprob,
    TopLogprob,
)

TokenText = Callable[[int], str]


def _text(token_id: int, entry: Logprob, token_text: TokenText) -> str:
    return entry.decoded_token if entry.decoded_token is not None else token_text(token_id)


def _top(entries: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    """The k most likely entries, by rank (entries without a rank are not in the top-k)."""
    ranked = [(t, e) for t, e in entries.items() if e.rank is not None and e.rank <= k]
    ranked.sort(key=lambda item: item[1].rank or 0)
    return ranked[:k]


def chat_logprobs(
    token_ids: Sequence[int],
    entries: Sequence[dict[int, Logprob]],
    top_k: int,
    token_text: TokenText,
) -> ChatLogprobs:
    content = []
    for token_id, entry in zip(token_ids, entries):
        sampled = entry[token_id]
        text = _text(token_id, sampled, token_text)
        top = [
            TopLogprob(token=(s := _text(t, e, token_text)), logprob=e.logprob,
                       bytes=list(s.encode("utf-8")))
            for t, e in _top(entry, top_k)
        ]  # fmt: skip
        content.append(
            TokenLogprob(
                token=text,
                logprob=sampled.logprob,
                bytes=list(text.encode("utf-8")),
                top_logprobs=top,
            )
        )
    return ChatLogprobs(content=content)


def completion_logprobs(
    token_ids: Sequence[int],
    entries: Sequence[dict[int, Logprob]],
    top_k: int,
    token_text: TokenText,
    start_offset: int,
) -> CompletionLogprobs:
    """`start_offset`: the character offset in the choice's text where these tokens begin."""
    out = CompletionLogprobs()
    offset = start_offset
    for token_id, entry in zip(token_ids, entries):
        sampled = entry[token_id]
        text = _text(token_id, sampled, token_text)
        out.tokens.append(text)
        out.token_logprobs.append(sampled.logprob)
        out.text_offset.append(offset)
        offset += len(text)
        # OpenAI: the k most likely tokens plus the sampled one (up to k + 1 entries). Tokens
        # that decode to the same text (e.g. partial UTF-8 bytes, shown as U+FFFD) share a key:
        # the more likely one is kept, and the sampled token's own logprob always wins.
        top: dict[str, float] = {}
        for t, e in _top(entry, top_k):
            top.setdefault(_text(t, e, token_text), e.logprob)
        top[text] = sampled.logprob
        out.top_logprobs.append(top)
    return out


def echo_logprobs(
    prompt_ids: Sequence[int],
    entries: Sequence[dict[int, Logprob] | None],
    top_k: int,
    token_text: TokenText,
) -> CompletionLogprobs:
    """The prompt's part of legacy completions logprobs with `echo` (OpenAI's shape): every
    prompt token, the first with a null logprob and null top_logprobs, offsets from 0."""
    out = CompletionLogprobs()
    if not prompt_ids:
        return out
    first = token_text(prompt_ids[0])
    out.tokens.append(first)
    out.token_logprobs.append(None)
    out.top_logprobs.append(None)
    out.text_offset.append(0)
    rest = [e for e in entries[1:] if e is not None]
    tail = completion_logprobs(prompt_ids[1:], rest, top_k, token_text, len(first))
    out.tokens += tail.tokens
    out.token_logprobs += tail.token_logprobs
    out.top_logprobs += tail.top_logprobs
    out.text_offset += tail.text_offset
    return out


def join_logprobs(head: CompletionLogprobs, tail: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=head.tokens + tail.tokens,
        token_logprobs=head.token_logprobs + tail.token_logprobs,
        top_logprobs=head.top_logprobs + tail.top_logprobs,
        text_offset=head.text_offset + tail.text_offset,
    )


def vllm_prompt_logprobs(
    prompt_ids: Sequence[int],
    entries: Sequence[dict[int, Logprob] | None],
    top_k: int,
    token_text: TokenText,
) -> PromptLogprobList:
    """vLLM's `prompt_logprobs`: None first, then per token {id: {logprob, rank, decoded_token}}
    holding the prompt token and the top_k most likely (the engine may have computed more)."""
    out: PromptLogprobList = []
    for token_id, entry in zip(prompt_ids, entries):
        if entry is None:
            out.append(None)
            continue
        keep = {token_id: entry[token_id]}
        keep.update(_top(entry, top_k))
        out.append(
            {
                t: PromptLogprob(
                    logprob=e.logprob, rank=e.rank, decoded_token=_text(t, e, token_text)
                )
                for t, e in keep.items()
            }
        )
    return out
