"""No silent drops (issue 13, item 4): undeclared request fields are logged once per name, and
fields whose semantics the engine does not implement are a 400 naming the field."""

from __future__ import annotations

import logging

import httpx
import pytest

from kestrel_server.errors import APIError
from kestrel_server.protocol import ChatCompletionRequest, CompletionRequest
from kestrel_server.request_fields import REFUSED_FIELDS, FieldPolicy, extra_fields
from tests.server.harness import MODEL_NAME

MSGS = [{"role": "user", "content": "hi"}]


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": MSGS, **fields})


def test_extra_fields_are_kept_with_their_nested_names():
    body = chat(metadata={"a": "b"}, messages=[{"role": "user", "content": "x", "cache": 1}])
    assert dict(extra_fields(body)) == {"metadata": {"a": "b"}, "messages[].cache": 1}


def test_ignored_and_unknown_fields_are_logged_once_per_name(caplog):
    policy = FieldPolicy()
    with caplog.at_level(logging.WARNING, logger="kestrel_server.request_fields"):
        for _ in range(3):
            policy.check(chat(store=True, service_tier="auto", frobnicate=1, user="u"))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4, lines
    assert sum("'frobnicate' is unknown" in line for line in lines) == 1
    for name in ("store", "service_tier", "user"):
        assert sum(f"'{name}' is accepted but has no effect" in line for line in lines) == 1


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("modalities", ["text", "audio"]),
        ("prediction", {"type": "content", "content": "x"}),
        ("web_search_options", {}),
        ("functions", [{"name": "f"}]),
        ("function_call", "auto"),
        ("best_of", 3),
        ("use_beam_search", True),
        ("truncate_prompt_tokens", 5),
    ],
)
def test_unimplemented_fields_are_refused_by_name(name, value):
    with pytest.raises(APIError) as info:
        FieldPolicy().check(chat(**{name: value}))
    assert info.value.status == 400
    assert info.value.param == name
    assert info.value.code == "unsupported_field"
    assert REFUSED_FIELDS[name][0] in info.value.message


@pytest.mark.parametrize(
    ("name", "value"),
    [("best_of", 1), ("use_beam_search", False), ("modalities", ["text"]), ("tools", []),
     ("tool_choice", "none"), ("response_format", {"type": "text"}), ("audio", None)],
)  # fmt: skip
def test_values_that_ask_for_nothing_pass(name, value, caplog):
    with caplog.at_level(logging.WARNING, logger="kestrel_server.request_fields"):
        FieldPolicy().check(chat(**{name: value}))
    assert not caplog.records


def test_a_bool_is_not_mistaken_for_a_number():
    with pytest.raises(APIError):
        FieldPolicy().check(CompletionRequest.model_validate({"prompt": "x", "best_of": True}))


def test_remembered_names_are_bounded(caplog):
    policy = FieldPolicy(max_logged=3)
    with caplog.at_level(logging.WARNING, logger="kestrel_server.request_fields"):
        policy.check(chat(**{f"f{i}": i for i in range(10)}))
    assert len(policy.logged) == 3
    assert len(caplog.records) == 4  # three names and the "not logged any more" line


def test_server_refuses_and_accepts_by_the_table(server):
    base = {"model": MODEL_NAME, "messages": MSGS, "max_tokens": 2}
    url = server.url + "/v1/chat/completions"
    r = httpx.post(url, json={**base, "audio": {"voice": "alloy"}}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "audio"
    r = httpx.post(url, json={**base, "metadata": {"k": "v"}, "store": False}, timeout=60)
    assert r.status_code == 200, r.text
    body = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2, "best_of": 2}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of", r.text
