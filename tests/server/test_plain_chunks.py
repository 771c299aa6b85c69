"""The streamed completion and chat chunks built without response models (`_plain_chunk`) are
byte for byte the chunks the pydantic models give (`_chunk`), for any text, reasons and choices."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from kestrel_server.chat import PlainDelta, _ChatEvents
from kestrel_server.completions import PlainChoice, _CompletionEvents, _Shown

TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)),  # no lone surrogates (not UTF-8)
    max_size=40,
) | st.sampled_from(['"', "\\", "\n\r\t\b\f", "\x00\x1f\x7f", "\x85\u2028\u2029", "é😀", ""])
CHOICE = st.builds(
    PlainChoice,
    index=st.integers(0, 300),
    text=TEXT,
    finish_reason=st.sampled_from([None, "stop", "length", "abort"]),
    stop_reason=st.none() | st.integers(0, 200_000) | TEXT,
)


@settings(max_examples=300, deadline=None)
@given(
    choices=st.lists(CHOICE, min_size=1, max_size=4),
    request_id=st.sampled_from(["cmpl-1", 'cmpl-é"x', "a\\b"]),
    model=st.sampled_from(["m", "Qwen/Qwen2.5-0.5B", "mödel\u2028"]),
)
def test_plain_chunks_equal_the_models(choices, request_id, model):
    events = _CompletionEvents(
        None, request_id, model, 1, None, [""], _Shown(vllm_k=None, echo_k=None, score_only=False)
    )
    fast = events._plain_chunk(choices)
    slow = events._chunk([c.model() for c in choices])
    assert fast == slow
    assert fast.startswith("data: ") and fast.endswith("\n\n") and "\n" not in fast[:-2]
    body = json.loads(fast[6:])
    assert [c["text"] for c in body["choices"]] == [c.text for c in choices]


DELTA = st.builds(
    PlainDelta,
    index=st.integers(0, 300),
    content=TEXT,
    finish_reason=st.sampled_from([None, "stop", "length", "abort"]),
    stop_reason=st.none() | st.integers(0, 200_000) | TEXT,
)


@settings(max_examples=300, deadline=None)
@given(
    choices=st.lists(DELTA, min_size=1, max_size=4),
    request_id=st.sampled_from(["chatcmpl-1", 'chatcmpl-é"x']),
    model=st.sampled_from(["m", "mödel\u2028"]),
)
def test_plain_chat_chunks_equal_the_models(choices, request_id, model):
    events = _ChatEvents(None, request_id, model, 1, None, include_usage=False)
    fast = events._plain_chunk(choices)
    slow = events._chunk([c.model() for c in choices])
    assert fast == slow
    body = json.loads(fast[6:])
    assert [c["delta"]["content"] for c in body["choices"]] == [c.content for c in choices]
