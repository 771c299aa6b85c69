"""Bad input gets a 4xx in OpenAI's error shape, naming the parameter; never a 500."""

from __future__ import annotations

import httpx
import pytest

from tests.server.harness import MAX_MODEL_LEN, MODEL_NAME

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MSGS = [{"role": "user", "content": "hi"}]


def chat(**fields):
    return {"model": MODEL_NAME, "messages": MSGS, "max_tokens": 4, **fields}


def completion(**fields):
    return {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 4, **fields}


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if param is not None:
        assert error["param"] == param, error
    return error


BAD_PARAMS = [
    (CHAT, chat(temperature=-1), "temperature"),
    (CHAT, chat(top_p=1.5), "top_p"),
    (CHAT, chat(top_k=-2), "top_k"),
    (CHAT, chat(min_p=2), "min_p"),
    (CHAT, chat(n=0), "n"),
    # max_tokens 0 on chat: a 400 as vLLM's (its SamplingParams refuses max_tokens < 1),
    # either name, streaming or not; only /v1/completions takes 0 (with echo: score the prompt).
    (CHAT, chat(max_tokens=0), "max_tokens"),
    (CHAT, chat(max_completion_tokens=0), "max_completion_tokens"),
    (CHAT, chat(max_tokens=0, stream=True), "max_tokens"),
    (CHAT, chat(max_completion_tokens=0, max_tokens=5), "max_completion_tokens"),
    (CHAT, chat(max_completion_tokens=-3), "max_completion_tokens"),
    (CHAT, chat(presence_penalty=3), "presence_penalty"),
    (CHAT, chat(frequency_penalty=-2.5), "frequency_penalty"),
    (CHAT, chat(repetition_penalty=0), "repetition_penalty"),
    (CHAT, chat(logit_bias={"abc": 1}), "logit_bias.abc"),
    (CHAT, chat(logit_bias={"5": 500}), "logit_bias.5"),
    (CHAT, chat(seed=2**70), "seed"),
    (CHAT, chat(min_tokens=9), "min_tokens"),
    (CHAT, chat(logprobs=True, top_logprobs=30), "top_logprobs"),
    (CHAT, chat(top_logprobs=2), "top_logprobs"),
    (CHAT, chat(stop=5), "stop"),
    (CHAT, chat(stream_options={"include_usage": True}), "stream_options"),
    (CHAT, chat(n="many"), "n"),
    (CHAT, {"model": MODEL_NAME}, "messages"),
    (CHAT, chat(messages=[]), "messages"),
    (CHAT, chat(messages=[{"role": "robot", "content": "x"}]), "messages.0.role"),
    (CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), None),
    (COMPLETIONS, completion(logprobs=21), "logprobs"),
    (COMPLETIONS, completion(max_tokens=0), "max_tokens"),  # 0 only with echo
    (COMPLETIONS, completion(max_tokens=-1), "max_tokens"),
    (COMPLETIONS, completion(prompt_logprobs=21), "prompt_logprobs"),
    (CHAT, chat(prompt_logprobs=-1), "prompt_logprobs"),
    (COMPLETIONS, completion(prompt=[]), "prompt"),
    (COMPLETIONS, completion(prompt=[1, 100000]), "prompt"),
    (COMPLETIONS, completion(prompt=[[1, 2], "mixed"]), "prompt"),
    (COMPLETIONS, completion(stop_token_ids=[100000]), None),
    (COMPLETIONS, completion(suffix="x"), "suffix"),
    ("/detokenize", {"tokens": [-1]}, "tokens.0"),
    ("/tokenize", {}, "prompt"),
]


@pytest.mark.parametrize(("path", "body", "param"), BAD_PARAMS)
def test_bad_parameters_are_400(server, path, body, param):
    r = httpx.post(server.url + path, json=body, timeout=30)
    error = assert_error(r, 400, param)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("raw", [b'{"model": "tiny", "messages": [', b"not json", b"[1, 2]", b""])
def test_malformed_json_is_400(server, raw):
    r = httpx.post(
        server.url + CHAT, content=raw, headers={"Content-Type": "application/json"}, timeout=30
    )
    assert_error(r, 400)


def test_context_length_error_names_both_lengths_and_the_limit(server):
    r = httpx.post(server.url + COMPLETIONS, json=completion(prompt=[5] * 100, max_tokens=450))
    error = assert_error(r, 400, "max_tokens")
    assert error["code"] == "context_length_exceeded"
    for number in ("100", "450", "550", str(MAX_MODEL_LEN)):
        assert number in error["message"]
    r = httpx.post(server.url + COMPLETIONS, json=completion(prompt=[5] * 600, max_tokens=1))
    error = assert_error(r, 400)
    assert "600" in error["message"] and str(MAX_MODEL_LEN) in error["message"]


def test_unknown_model_is_404(server):
    for path, body in ((CHAT, chat(model="gpt-4")), (COMPLETIONS, completion(model="gpt-4"))):
        error = assert_error(httpx.post(server.url + path, json=body, timeout=30), 404, "model")
        assert error["code"] == "model_not_found" and "gpt-4" in error["message"]


def test_unknown_route_and_method(server):
    assert_error(httpx.get(server.url + "/v1/nothing", timeout=30), 404)
    assert_error(httpx.get(server.url + COMPLETIONS, timeout=30), 405)


def test_openai_client_raises_typed_errors(client):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_NAME, messages=MSGS, temperature=-1)
    assert info.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")


def test_server_still_healthy_after_bad_requests(server, client):
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200
    r = client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=3)
    assert r.usage.completion_tokens >= 1
