"""Pure functions of the server package: SSE framing, logprob shapes, error mapping."""

from __future__ import annotations

import json

import pytest

from kestrel.engine.async_engine import EngineDeadError, QueueFullError, RequestTooLargeError
from kestrel.errors import InvalidRequestError
from kestrel.outputs import Logprob
from kestrel.sampling_params import SamplingParams
from kestrel_server.common import check_context, sse
from kestrel_server.errors import APIError, from_exception
from kestrel_server.logprobs import chat_logprobs, completion_logprobs


def test_sse_keeps_one_event_per_line_for_unicode_line_breaks():
    payload = json.dumps({"text": "a\u2028b\u2029c\x85d"}, ensure_ascii=False)
    event = sse(payload)
    assert event.endswith("\n\n") and event.startswith("data: ")
    line = event[: -len("\n\n")]
    assert len(line.splitlines()) == 1
    assert json.loads(line[len("data: ") :]) == {"text": "a\u2028b\u2029c\x85d"}


def _entries():
    # Token 7 was sampled (rank 2); tokens 3 and 9 both decode to U+FFFD.
    return [
        {
            3: Logprob(-0.5, 1, "\ufffd"),
            7: Logprob(-1.0, 2, "ab"),
            9: Logprob(-2.0, 3, "\ufffd"),
        }
    ]


def test_chat_logprobs_shape():
    out = chat_logprobs([7], _entries(), 2, lambda t: "?")
    (entry,) = out.content
    assert (entry.token, entry.logprob, entry.bytes) == ("ab", -1.0, [97, 98])
    assert [(t.token, t.logprob) for t in entry.top_logprobs] == [("\ufffd", -0.5), ("ab", -1.0)]


def test_completion_logprobs_dedupes_equal_strings_and_keeps_the_sampled_token():
    out = completion_logprobs([7], _entries(), 3, lambda t: "?", start_offset=5)
    assert out.tokens == ["ab"] and out.token_logprobs == [-1.0] and out.text_offset == [5]
    assert out.top_logprobs == [{"\ufffd": -0.5, "ab": -1.0}]
    zero = completion_logprobs([7], _entries(), 0, lambda t: "?", start_offset=0)
    assert zero.top_logprobs == [{"ab": -1.0}]


def test_check_context():
    assert check_context(10, None, 100) == 90
    assert check_context(10, 90, 100) == 90
    for prompt, max_tokens in ((10, 91), (100, 1), (150, None)):
        try:
            check_context(prompt, max_tokens, 100)
        except APIError as exc:
            assert exc.status == 400 and exc.code == "context_length_exceeded"
            assert str(prompt) in exc.message and "100" in exc.message
        else:
            raise AssertionError(f"{prompt} + {max_tokens} passed")


def test_exception_mapping():
    assert from_exception(QueueFullError("full")).status == 503
    assert from_exception(EngineDeadError("dead")).status == 503
    # The param comes from the typed exception, never from parsing its text.
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(top_p=2.0)
    err = from_exception(info.value)
    assert (err.status, err.param, err.type) == (400, "top_p", "invalid_request_error")
    err = from_exception(ValueError("SamplingParams.top_p = 2 is invalid; allowed: (0, 1]"))
    assert (err.status, err.param) == (400, None)
    err = from_exception(RequestTooLargeError("n", "too many"))
    assert (err.status, err.param, err.code) == (400, "n", "request_too_large")
    assert from_exception(RuntimeError("bug")).status == 500


def test_in_process_app_defaults_health_and_metrics(tiny_model, offline, tmp_path):
    """build_app over an engine whose generation_config.json says do_sample=false: requests
    that name no temperature decode greedily. /health is 503 once the engine is stopped."""
    import asyncio
    import shutil

    import httpx

    from kestrel.config import EngineConfig
    from kestrel.engine.async_engine import AsyncLLMEngine
    from kestrel.sampling_params import SamplingParams
    from kestrel_server import ServerArgs, build_app

    model = tmp_path / "greedy-model"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**config, "do_sample": False}))
    prompt = "The kestrel is"
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    expected = offline.generate(prompt, params, use_tqdm=False)[0].outputs[0].text

    async def main():
        engine = AsyncLLMEngine.from_config(EngineConfig(model=str(model), max_model_len=256))
        app = build_app(engine, ServerArgs(served_model_name="m"))
        engine.start()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            body = {"prompt": prompt, "max_tokens": 12, "ignore_eos": True}
            texts = [
                (await http.post("/v1/completions", json=body)).json()["choices"][0]["text"]
                for _ in range(2)
            ]
            healthy = (await http.get("/health")).status_code
            metrics = (await http.get("/metrics")).text
            await engine.shutdown()
            dead = await http.get("/health")
        return texts, healthy, metrics, dead

    texts, healthy, metrics, dead = asyncio.run(asyncio.wait_for(main(), 120))
    assert texts == [expected, expected]
    assert healthy == 200
    assert 'kestrel:generation_tokens_total{model_name="m"} 24.0' in metrics
    assert 'kestrel:request_success_total{finished_reason="length",model_name="m"} 2.0' in metrics
    assert 'kestrel:prompt_tokens_total{model_name="m"}' in metrics
    assert "kestrel:time_to_first_token_seconds_count" in metrics
    assert dead.status_code == 503 and dead.json()["error"]["code"] == "engine_unavailable"
