"""Each known hostile request (issue 10) is sent beside two healthy streams: it gets a clear 4xx
in OpenAI's shape, the streams complete to their last token, and /health stays 200."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from kestrel_server.protocol import MAX_STOP_STRINGS
from tests.server.harness import MAX_MODEL_LEN, MODEL_NAME

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MSGS = [{"role": "user", "content": "hi"}]
HEALTHY_TOKENS = 64
RUNNING = 'kestrel:num_requests_running{model_name="tiny"}'
WAITING = 'kestrel:num_requests_waiting{model_name="tiny"}'


def chat(**fields):
    return {"model": MODEL_NAME, "messages": MSGS, "max_tokens": 4, **fields}


def completion(**fields):
    return {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 4, **fields}


class HealthyStream(threading.Thread):
    """A streaming completion of HEALTHY_TOKENS tokens read to its [DONE]."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.events: list[str] = []
        self.error: BaseException | None = None
        self.started = threading.Event()

    def run(self) -> None:
        body = completion(
            prompt="a healthy request", max_tokens=HEALTHY_TOKENS, ignore_eos=True, stream=True
        )
        body["temperature"] = 0.0
        try:
            with httpx.stream("POST", self.url + COMPLETIONS, json=body, timeout=60) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[6:])
                        self.started.set()
        except BaseException as exc:  # noqa: BLE001 - reported by check()
            self.error = exc
            self.started.set()

    def check(self) -> None:
        self.join(60)
        assert not self.is_alive(), "healthy stream did not finish"
        assert self.error is None, self.error
        assert self.events and self.events[-1] == "[DONE]", self.events[-3:]
        chunks = [json.loads(e) for e in self.events[:-1]]
        assert all("error" not in c for c in chunks), chunks[-1]
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        assert chunks[-1]["choices"][0]["finish_reason"] == "length", chunks[-1]
        assert text


@contextlib.contextmanager
def beside_healthy_streams(server) -> Iterator[None]:
    streams = [HealthyStream(server.url) for _ in range(2)]
    for s in streams:
        s.start()
    for s in streams:
        assert s.started.wait(30)
    yield
    for s in streams:
        s.check()
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def assert_4xx(r: httpx.Response, status: int = 400, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param, error
    return error


HOSTILE = [
    ("top_k_int32_overflow_sampled", COMPLETIONS,
     completion(temperature=1, top_k=2147483648), "top_k"),
    ("top_k_over_vocab_greedy_logprobs", COMPLETIONS,
     completion(temperature=0, top_k=2**40, logprobs=2), "top_k"),
    ("top_k_over_vocab_chat", CHAT, chat(temperature=1, top_k=10**6), "top_k"),
    ("n_huge", COMPLETIONS, completion(n=3_000_000), "n"),
    ("prompt_list_10000", COMPLETIONS, completion(prompt=["hi"] * 10_000), "prompt"),
    ("seed_beyond_64_bits", CHAT, chat(seed=2**64), "seed"),
    ("max_tokens_string", CHAT, chat(max_tokens="10"), "max_tokens"),
    ("stream_string", CHAT, chat(stream="yes"), "stream"),
    ("temperature_nan", CHAT, chat(temperature=float("nan")), "temperature"),
    ("temperature_inf", CHAT, chat(temperature=float("inf")), "temperature"),
    ("role_free_string", CHAT, chat(messages=[{"role": "wizard", "content": "x"}]),
     "messages.0.role"),
    ("template_kwargs_messages", CHAT, chat(chat_template_kwargs={"messages": []}),
     "chat_template_kwargs"),
    ("template_kwargs_add_generation_prompt", CHAT,
     chat(chat_template_kwargs={"add_generation_prompt": "no"}), "chat_template_kwargs"),
    ("template_kwargs_chat_template", CHAT,
     chat(chat_template_kwargs={"chat_template": "{{ 1/0 }}"}), "chat_template_kwargs"),
    ("template_kwargs_tools_int", CHAT, chat(chat_template_kwargs={"tools": 5}),
     "chat_template_kwargs.tools"),
    ("template_kwargs_tools_strings", CHAT, chat(chat_template_kwargs={"tools": ["x"]}),
     "chat_template_kwargs.tools"),
    ("template_kwargs_documents_dict", CHAT, chat(chat_template_kwargs={"documents": {"a": 1}}),
     "chat_template_kwargs.documents"),
    ("too_many_stop_strings", CHAT, chat(stop=["x"] * (MAX_STOP_STRINGS + 1)), "stop"),
    ("max_tokens_beyond_context", COMPLETIONS, completion(max_tokens=MAX_MODEL_LEN * 4),
     "max_tokens"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "path", "body", "param"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_request_is_4xx_beside_healthy_streams(server, name, path, body, param):
    raw = json.dumps(body)  # allows NaN and Infinity, as some clients send them
    headers = {"Content-Type": "application/json"}
    with beside_healthy_streams(server):
        r = httpx.post(server.url + path, content=raw, headers=headers, timeout=60)
        error = assert_4xx(r, 400, param)
        assert error["type"] == "invalid_request_error"


# Lone UTF-16 surrogates, sent as raw JSON escapes (a Python client would refuse to encode them).
SURROGATES = [
    (COMPLETIONS, '{"model": "tiny", "prompt": "a\\ud800b", "max_tokens": 2}', "prompt"),
    (COMPLETIONS, '{"model": "tiny", "prompt": ["ok", "\\udfff"], "max_tokens": 2}', "prompt.1"),
    (CHAT, '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
     "messages.0.content"),
    (CHAT, ('{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", '
     '"text": "\\ud83d"}]}]}'), None),
    ("/tokenize", '{"prompt": "\\ud800"}', "prompt"),
    ("/tokenize", '{"messages": [{"role": "user", "content": "x\\udc00"}]}', None),
]  # fmt: skip


@pytest.mark.parametrize(("path", "raw", "param"), SURROGATES)
def test_lone_surrogates_are_400_and_keep_the_connection(server, path, raw, param):
    with beside_healthy_streams(server), httpx.Client(timeout=30) as http:
        r = http.post(server.url + path, content=raw, headers={"Content-Type": "application/json"})
        error = assert_4xx(r, 400)
        if param is not None:
            assert error["param"] == param, error
        assert "surrogate" in error["message"]
        assert r.headers.get("connection", "").lower() != "close"
        # The same connection serves the next request.
        assert http.get(server.url + "/health").status_code == 200


def test_large_prompt_does_not_block_the_event_loop(server):
    """A 10 MB prompt is tokenized off the loop: /health answers fast meanwhile."""
    huge = completion(prompt="kestrel " * (10 * 1024 * 1024 // 8))
    result: dict[str, httpx.Response] = {}

    def send() -> None:
        result["r"] = httpx.post(server.url + COMPLETIONS, json=huge, timeout=120)

    sender = threading.Thread(target=send)
    with beside_healthy_streams(server):
        sender.start()
        latencies = []
        while sender.is_alive() and len(latencies) < 200:
            t0 = time.monotonic()
            assert httpx.get(server.url + "/health", timeout=10).status_code == 200
            latencies.append(time.monotonic() - t0)
            time.sleep(0.02)
        sender.join(120)
    error = assert_4xx(result["r"], 400)
    assert error["code"] == "context_length_exceeded"
    assert len(latencies) >= 3, "the prompt was handled too fast to observe"
    assert max(latencies) < 1.0, latencies


def test_body_over_the_limit_is_413(server):
    with beside_healthy_streams(server):
        big = b'{"prompt": "' + b"x" * (33 * 1024 * 1024) + b'"}'
        r = httpx.post(
            server.url + COMPLETIONS,
            content=big,
            headers={"Content-Type": "application/json"},
            timeout=60,
        )
        error = assert_4xx(r, 413)
        assert "max-request-bytes" in error["message"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted while read
            yield b'{"prompt": "'
            for _ in range(34):
                yield b"x" * (1024 * 1024)
            yield b'"}'

        r = httpx.post(
            server.url + COMPLETIONS,
            content=chunks(),
            headers={"Content-Type": "application/json"},
            timeout=60,
        )
        assert_4xx(r, 413)


def wait_for(predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_prompt_batch_is_admitted_at_once_and_aborted_on_disconnect(server):
    """512 prompts enter the engine together; the client leaving aborts all of them."""
    body = completion(prompt=["a kestrel"] * 512, max_tokens=400, ignore_eos=True)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + COMPLETIONS, json=body, timeout=1.0)

    def idle() -> bool:
        m = server.metrics()
        return m[RUNNING] == 0 and m[WAITING] == 0

    wait_for(idle, 10.0)
    r = httpx.post(server.url + COMPLETIONS, json=completion(), timeout=30)
    assert r.status_code == 200


def test_n_counts_as_sequences_and_never_fitting_batch_is_400(restricted_server):
    from tests.server.harness import API_KEY

    headers = {"Authorization": f"Bearer {API_KEY}"}
    # max_num_seqs=1 + max_queued_requests=1: two sequences fit, three never will.
    r = httpx.post(
        restricted_server.url + COMPLETIONS, json=completion(n=3), headers=headers, timeout=30
    )
    error = assert_4xx(r, 400, "n")
    assert error["code"] == "request_too_large"
    r = httpx.post(
        restricted_server.url + COMPLETIONS,
        json=completion(prompt=["a", "b", "c"]),
        headers=headers,
        timeout=30,
    )
    assert_4xx(r, 400)
    r = httpx.post(
        restricted_server.url + COMPLETIONS, json=completion(n=2), headers=headers, timeout=30
    )
    assert r.status_code == 200 and len(r.json()["choices"]) == 2


def test_openapi_documents_what_is_returned(server):
    schema = httpx.get(server.url + "/openapi.json", timeout=30).json()
    for path in (CHAT, COMPLETIONS):
        responses = schema["paths"][path]["post"]["responses"]
        assert "422" not in responses
        assert {"200", "400", "401", "404", "413", "503"} <= set(responses)
        assert "text/event-stream" in responses["200"]["content"]
    props = schema["components"]["schemas"]["ChatMessage"]["properties"]
    assert set(props["role"]["enum"]) == {"system", "developer", "user", "assistant", "tool"}
    temperature = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert temperature["temperature"]["anyOf"][0]["minimum"] == 0.0
