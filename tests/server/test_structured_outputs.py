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
         "structured_outputs"),
        ({"guided_regex": "["}, "structured_outputs"),
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
