"""Client disconnects abort their requests and free the KV cache (read from /metrics); API keys
guard every route that does work; a full queue answers 503 with Retry-After."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.server.harness import API_KEY, MODEL_NAME

RUNNING = 'kestrel:num_requests_running{model_name="tiny"}'
KV_USAGE = 'kestrel:kv_cache_usage_perc{model_name="tiny"}'
ABORTED = 'kestrel:request_success_total{finished_reason="abort",model_name="tiny"}'
LONG_COMPLETION = {
    "model": MODEL_NAME,
    "prompt": "A long story about a kestrel",
    "max_tokens": 480,
    "ignore_eos": True,
    "temperature": 0.0,
}


def wait_until_idle(server, timeout_s: float = 20.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        samples = server.metrics()
        if samples[RUNNING] == 0 and samples[KV_USAGE] == 0:
            return samples
        assert time.monotonic() < deadline, f"server still busy: {samples}"
        time.sleep(0.05)


def test_stream_disconnect_frees_kv_cache(server):
    before = server.metrics().get(ABORTED, 0.0)
    body = LONG_COMPLETION | {"stream": True}
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", server.url + "/v1/completions", json=body) as r,
    ):
        assert r.status_code == 200
        lines = r.iter_lines()
        received = [line for _, line in zip(range(6), lines)]
        assert any(line.startswith("data: {") for line in received)
        mid = server.metrics()
        assert mid[RUNNING] == 1 and mid[KV_USAGE] > 0
    # Leaving the block closed the connection mid-stream.
    after = wait_until_idle(server)
    assert after[ABORTED] == before + 1


def test_non_stream_disconnect_frees_kv_cache(server):
    before = server.metrics().get(ABORTED, 0.0)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=LONG_COMPLETION, timeout=0.3)
    after = wait_until_idle(server)
    assert after[ABORTED] == before + 1


def test_api_key_required_on_every_working_route(restricted_server):
    url = restricted_server.url
    body = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 401, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "invalid_api_key"
    assert httpx.get(url + "/v1/models", timeout=30).status_code == 401
    good = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(url + "/v1/completions", json=body, headers=good, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    for path, payload in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1, 2]})):
        r = httpx.post(url + path, json=payload, timeout=30)
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.post(url + path, json=payload, headers=good, timeout=30).status_code == 200
    assert httpx.get(url + "/no/such/route", timeout=30).status_code == 401
    for path in ("/health", "/metrics", "/version", "/openapi.json"):
        assert httpx.get(url + path, timeout=30).status_code == 200


def test_openai_client_with_api_key(restricted_server):
    import openai

    base = restricted_server.url + "/v1"
    with openai.OpenAI(base_url=base, api_key=API_KEY, max_retries=0, timeout=30) as ok:
        r = ok.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert r.usage.completion_tokens >= 1
    with (
        openai.OpenAI(base_url=base, api_key="wrong", max_retries=0, timeout=30) as bad,
        pytest.raises(openai.AuthenticationError),
    ):
        bad.models.list()


def test_queue_full_is_503(restricted_server):
    url = restricted_server.url
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = LONG_COMPLETION | {"stream": True}
    # max_num_seqs=1 running + max_queued_requests=1 waiting: a third request is refused.
    with (
        httpx.Client(timeout=30, headers=headers) as a,
        httpx.Client(timeout=30, headers=headers) as b,
        a.stream("POST", url + "/v1/completions", json=body) as first,
        b.stream("POST", url + "/v1/completions", json=body) as second,
    ):
        assert first.status_code == 200 and second.status_code == 200
        r = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 503, r.text
        assert int(r.headers["Retry-After"]) >= 1
        error = r.json()["error"]
        assert error["code"] == "queue_full"
        assert set(error) == {"message", "type", "param", "code"}
    wait_until_idle(restricted_server)
    r = httpx.post(
        url + "/v1/completions",
        json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2},
        headers=headers,
        timeout=30,
    )
    assert r.status_code == 200
