"""Prompt logprobs through the server with the official openai client: `echo` + `logprobs`
(OpenAI's legacy shape, the prompt's tokens first), `max_tokens: 0` with echo (lm-eval's
loglikelihood requests), and vLLM's `prompt_logprobs` extra on completions and chat; the
numbers equal the offline engine's."""

from __future__ import annotations

import pytest

from kestrel import SamplingParams
from tests.server.harness import MODEL_NAME
from tests.server.test_openai_client import GREEDY, LONG, MESSAGES, PROMPT, tokenize


def offline_prompt_logprobs(offline, prompt, k: int):
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=k)
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        return offline.chat(prompt, params, use_tqdm=False)[0]
    return offline.generate([prompt], params, use_tqdm=False)[0]


def test_echo_with_logprobs_puts_the_prompt_first(client, server, offline):
    kwargs = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=5, logprobs=2, **GREEDY, **LONG)
    plain = client.completions.create(**kwargs).choices[0]
    echo = client.completions.create(echo=True, **kwargs).choices[0]
    ids = tokenize(server, prompt=PROMPT)
    lp = echo.logprobs
    num = len(ids)
    assert echo.text == PROMPT + plain.text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == num + 5
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # The completion's part is the plain request's, its offsets after the echoed prompt.
    assert lp.tokens[num:] == plain.logprobs.tokens
    assert lp.token_logprobs[num:] == pytest.approx(plain.logprobs.token_logprobs)
    assert [o - plain.logprobs.text_offset[0] for o in lp.text_offset[num:]] == [
        o - plain.logprobs.text_offset[0] + len(PROMPT) for o in plain.logprobs.text_offset
    ]
    ref = offline_prompt_logprobs(offline, PROMPT, 2)
    assert ref.prompt_token_ids == ids
    for i in range(1, num):
        assert lp.token_logprobs[i] == pytest.approx(ref.prompt_logprobs[i][ids[i]].logprob)
        top = lp.top_logprobs[i]
        assert 1 <= len(top) <= 3 and top[lp.tokens[i]] == pytest.approx(lp.token_logprobs[i])


def test_echo_max_tokens_zero_scores_the_prompt_only(client, server):
    kwargs = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1, **GREEDY)
    r = client.completions.create(**kwargs)
    choice = r.choices[0]
    num = len(tokenize(server, prompt=PROMPT))
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert len(choice.logprobs.tokens) == num and choice.logprobs.token_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in choice.logprobs.token_logprobs[1:])
    assert r.usage.prompt_tokens == num and r.usage.completion_tokens == 0
    chunks = [c for c in client.completions.create(stream=True, **kwargs) if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == PROMPT
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    streamed = [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.tokens]
    assert streamed == choice.logprobs.tokens
    # A batch of prompts (as lm-eval sends), each scored alone.
    batch = client.completions.create(**{**kwargs, "prompt": [PROMPT, "A kestrel hovers"]})
    assert [c.text for c in batch.choices] == [PROMPT, "A kestrel hovers"]
    assert batch.choices[0].logprobs.token_logprobs == pytest.approx(choice.logprobs.token_logprobs)


def test_echo_logprobs_stream_equals_non_stream(client):
    kwargs = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, echo=True, logprobs=3, n=2, **LONG)
    kwargs["extra_body"] = {**kwargs["extra_body"], "seed": 5}
    full = client.completions.create(temperature=0.7, **kwargs)
    chunks = list(client.completions.create(temperature=0.7, stream=True, **kwargs))
    for index in range(2):
        mine = [ch for c in chunks for ch in c.choices if ch.index == index]
        want = next(c for c in full.choices if c.index == index)
        assert "".join(c.text for c in mine) == want.text
        tokens = [t for c in mine if c.logprobs for t in c.logprobs.tokens]
        lps = [v for c in mine if c.logprobs for v in c.logprobs.token_logprobs]
        assert tokens == want.logprobs.tokens
        assert lps == pytest.approx(want.logprobs.token_logprobs)


def _check_vllm_shape(entries, ids, k, ref):
    assert entries[0] is None and len(entries) == len(ids)
    for i, entry in enumerate(entries[1:], start=1):
        assert str(ids[i]) in entry  # JSON keys are strings
        assert k <= len(entry) <= k + 1
        ranks = sorted(v["rank"] for t, v in entry.items() if t != str(ids[i]))
        assert ranks == list(range(1, len(ranks) + 1))
        for token, value in entry.items():
            assert set(value) == {"logprob", "rank", "decoded_token"}
            assert value["logprob"] == pytest.approx(ref.prompt_logprobs[i][int(token)].logprob)


def test_vllm_prompt_logprobs_extra_on_completions(client, server, offline):
    r = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=2, extra_body={"prompt_logprobs": 2}, **GREEDY
    )
    ids = tokenize(server, prompt=PROMPT)
    entries = r.model_dump()["choices"][0]["prompt_logprobs"]
    _check_vllm_shape(entries, ids, 2, offline_prompt_logprobs(offline, PROMPT, 2))
    plain = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2, **GREEDY)
    assert plain.model_dump()["choices"][0].get("prompt_logprobs") is None
    stream = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=2, stream=True,
        extra_body={"prompt_logprobs": 2}, **GREEDY,
    )  # fmt: skip
    sent = [c.model_dump()["choices"][0].get("prompt_logprobs") for c in stream if c.choices]
    assert sent[0] == entries and all(s is None for s in sent[1:])


def test_vllm_prompt_logprobs_extra_on_chat(client, server, offline):
    kwargs = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=2, **GREEDY)
    r = client.chat.completions.create(extra_body={"prompt_logprobs": 0}, **kwargs)
    ids = tokenize(server, messages=MESSAGES)
    entries = r.model_dump()["prompt_logprobs"]
    _check_vllm_shape(entries, ids, 0, offline_prompt_logprobs(offline, MESSAGES, 0))
    chunks = list(
        client.chat.completions.create(stream=True, extra_body={"prompt_logprobs": 0}, **kwargs)
    )
    sent = [c.model_dump().get("prompt_logprobs") for c in chunks]
    assert [s for s in sent if s is not None] == [entries]


def test_lm_eval_loglikelihood_request(server, offline):
    """The request lm-eval's local-completions sends per choice (token ids, echo, logprobs 1,
    max_tokens 1): the choice's loglikelihood, token_logprobs[ctxlen:-1] summed, equals the
    offline engine's prompt logprobs of the same tokens."""
    import httpx

    context = tokenize(server, prompt="Question: what do bees make?\nAnswer:")
    choice = tokenize(server, prompt=" honey", add_special_tokens=False)
    body = {
        "model": MODEL_NAME, "prompt": [context + choice], "temperature": 0, "max_tokens": 1,
        "logprobs": 1, "seed": 1234, "echo": True,
    }  # fmt: skip
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    lps = r.json()["choices"][0]["logprobs"]["token_logprobs"]
    got = sum(lps[len(context) : -1])
    ref = offline_prompt_logprobs(offline, context + choice, 0).prompt_logprobs
    want = sum(ref[i][t].logprob for i, t in enumerate(choice, start=len(context)))
    assert got == pytest.approx(want, abs=1e-4)
