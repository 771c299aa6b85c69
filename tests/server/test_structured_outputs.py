"""Structured outputs through the server with the official openai client: `.parse()` with a
pydantic model, json_schema and json_object response formats (streaming too), vLLM's
structured_outputs and guided_* extras, and 400s for constraints that cannot be used."""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import pytest
from pydantic import BaseModel, Field

from tests.server.harness import MODEL_NAME

MESSAGES = [{"role": "user", "content": "Describe a person."}]


class Person(BaseModel):
    name: Literal["ada", "bob"]
    age: int = Field(ge=0, le=99)


def test_parse_with_a_pydantic_model(client):
    r = client.chat.completions.parse(
        model=MODEL_NAME, messages=MESSAGES, response_format=Person, max_tokens=100, temperature=0
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Person)
    assert Person.model_validate_json(choice.message.content) == choice.message.parsed


def test_json_schema_streaming_equals_non_streaming(client):
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "p", "schema": Person.model_json_schema()},
    }
    kw = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 100, "temperature": 0}
    full = client.chat.completions.create(response_format=fmt, **kw).choices[0].message.content
    stream = client.chat.completions.create(response_format=fmt, stream=True, **kw)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == full
    Person.model_validate_json(full)


def test_json_object_is_an_object_or_cut_by_length(client):
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, response_format={"type": "json_object"},
        max_tokens=200, temperature=0,
    )  # fmt: skip
    choice = r.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:
        assert choice.message.content.startswith("{")


@pytest.mark.parametrize(
    "extra, ok",
    [
        ({"guided_choice": ["alpha", "beta"]}, lambda t: t in ("alpha", "beta")),
        ({"guided_regex": r"[0-9]{2}-[a-c]"}, lambda t: re.fullmatch(r"[0-9]{2}-[a-c]", t)),
        ({"structured_outputs": {"choice": ["up", "down"]}}, lambda t: t in ("up", "down")),
        (
            {"guided_json": {"type": "object", "properties": {"k": {"enum": [1, 2]}},
                             "required": ["k"], "additionalProperties": False}},
            lambda t: json.loads(t)["k"] in (1, 2),
        ),
    ],
)  # fmt: skip
def test_vllm_extras_on_completions(client, extra, ok):
    r = client.completions.create(
        model=MODEL_NAME, prompt="x", max_tokens=40, temperature=1.0, seed=7, n=2,
        extra_body=extra,
    )  # fmt: skip
    for choice in r.choices:
        assert choice.finish_reason == "stop" and ok(choice.text), choice.text


@pytest.mark.parametrize(
    "body, param",
    [
        ({"response_format": {"type": "bogus"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
         "response_format"),
        ({"response_format": {"type": "json_schema",
                              "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
         "response_format"),
        ({"guided_regex": "["}, "guided_regex"),
        ({"guided_json": {"type": "object", "properties": {"a": {"type": "nope"}}}}, "guided_json"),
        ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"structured_outputs": {"nonsense": 1}}, "structured_outputs.nonsense"),
        ({"guided_choice": ["a"], "guided_regex": "b"}, "guided_choice"),
    ],
)  # fmt: skip
def test_constraints_that_cannot_be_used_are_400s(server, body, param):
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 5, **body},
        timeout=30,
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error


def test_bad_constraint_is_a_400_with_the_openai_client_streaming_or_not(client):
    """Checked in the API server before the request goes to the engine: a 400 even when
    streaming (no stream is started), naming the field that set it."""
    import openai

    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model=MODEL_NAME, messages=MESSAGES, max_tokens=5, stream=stream,
                extra_body={"guided_regex": "(unclosed"},
            )  # fmt: skip
        assert err.value.status_code == 400 and err.value.param == "guided_regex"
        assert "regex" in err.value.message
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(
                model=MODEL_NAME, prompt="x", max_tokens=5, stream=stream,
                extra_body={"structured_outputs": {"grammar": "start: nowhere"}},
            )  # fmt: skip
        assert err.value.param == "structured_outputs"


def test_oversized_constraint_is_a_400_naming_the_size_and_the_cap(server):
    regex = "a" * 131_073  # the default --max-grammar-chars is 131072
    r = httpx.post(
        server.url + "/v1/completions",
        json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 5, "guided_regex": regex},
        timeout=30,
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "guided_regex"
    assert "131073 characters" in error["message"] and "at most 131072" in error["message"]


def test_constraint_that_fails_against_the_vocabulary(server):
    """`<[999999]>` (a token id past the vocabulary) passes the server's check, which has no
    vocabulary; the engine's compile fails that request alone: a 400 without streaming, an
    error event once the stream has started; the server goes on serving."""
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 5,
            "guided_grammar": "start: <[999999]>"}  # fmt: skip
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert "constraint cannot be compiled" in r.json()["error"]["message"]
    with httpx.stream(
        "POST", server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=30
    ) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "constraint cannot be compiled" in json.loads(events[-2])["error"]["message"]
    ok = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 3}
    assert httpx.post(server.url + "/v1/chat/completions", json=ok, timeout=30).status_code == 200
