"""The official openai client against `kestrel serve`: chat and completions, streaming and not,
n > 1, stop, seeds, logprobs, usage; greedy outputs equal the offline engine's."""

from __future__ import annotations

import math

import httpx
import pytest

from kestrel import SamplingParams
from tests.server.harness import MAX_MODEL_LEN, MODEL_NAME

MESSAGES = [{"role": "user", "content": "Tell me about the kestrel."}]
PROMPT = "The kestrel is a small falcon"
GREEDY = {"temperature": 0.0}
LONG = {"extra_body": {"ignore_eos": True}}  # outputs of exactly max_tokens tokens


def tokenize(server, **body) -> list[int]:
    r = httpx.post(server.url + "/tokenize", json=body, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def offline_text(offline, prompt, max_tokens: int, **kw) -> tuple[str, list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        out = offline.chat(prompt, params, use_tqdm=False)[0].outputs[0]
    else:
        out = offline.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    return out.text, out.token_ids


def test_chat_greedy_matches_offline_engine(client, server, offline):
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=12, **GREEDY, **LONG
    )
    expected, ids = offline_text(offline, MESSAGES, 12)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected
    assert choice.finish_reason == "length"
    assert r.object == "chat.completion" and r.model == MODEL_NAME
    prompt_ids = tokenize(server, messages=MESSAGES)
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == len(ids) == 12
    assert r.usage.total_tokens == len(prompt_ids) + 12


def test_chat_stream_equals_non_stream(client):
    kwargs = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=20, **GREEDY, **LONG)
    full = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(
            stream=True, stream_options={"include_usage": True}, **kwargs
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_greedy_stream_and_echo(client, server, offline):
    expected, ids = offline_text(offline, PROMPT, 16)
    kwargs = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=16, **GREEDY, **LONG)
    full = client.completions.create(**kwargs)
    assert full.choices[0].text == expected
    assert full.usage.prompt_tokens == len(tokenize(server, prompt=PROMPT))
    assert full.usage.completion_tokens == len(ids)
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs))
    assert streamed == expected
    echo = client.completions.create(echo=True, **kwargs)
    assert echo.choices[0].text == PROMPT + expected
    echo_stream = client.completions.create(echo=True, stream=True, **kwargs)
    assert "".join(c.choices[0].text for c in echo_stream) == PROMPT + expected


def test_completion_token_id_prompt_and_batch(client, server, offline):
    ids = tokenize(server, prompt=PROMPT)
    by_ids = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=8, **GREEDY)
    by_text = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, **GREEDY)
    assert by_ids.choices[0].text == by_text.choices[0].text
    other = "Falcons hunt at dawn"
    batch = client.completions.create(
        model=MODEL_NAME, prompt=[PROMPT, other], max_tokens=8, n=2, **GREEDY, **LONG
    )
    assert [c.index for c in sorted(batch.choices, key=lambda c: c.index)] == [0, 1, 2, 3]
    texts = {c.index: c.text for c in batch.choices}
    first, _ = offline_text(offline, PROMPT, 8)
    second, _ = offline_text(offline, other, 8)
    assert [texts[0], texts[1], texts[2], texts[3]] == [first, first, second, second]
    assert batch.usage.completion_tokens == 4 * 8
    prompt_tokens = len(ids) + len(tokenize(server, prompt=other))
    assert batch.usage.prompt_tokens == prompt_tokens


def test_n_samples_with_seed(client):
    kwargs = dict(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=12, n=3, temperature=1.0, seed=7, **LONG
    )
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    texts_a = [c.message.content for c in sorted(a.choices, key=lambda c: c.index)]
    texts_b = [c.message.content for c in sorted(b.choices, key=lambda c: c.index)]
    assert texts_a == texts_b  # same seed: same samples
    assert len(set(texts_a)) == 3  # each sample draws from its own generator
    assert a.usage.completion_tokens == 3 * 12
    c = client.chat.completions.create(**{**kwargs, "seed": 8})
    assert [x.message.content for x in sorted(c.choices, key=lambda x: x.index)] != texts_a


def test_n_samples_stream_by_index(client):
    stream = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=10, n=2, temperature=1.0, seed=3,
        stream=True, **LONG,
    )  # fmt: skip
    texts = {0: "", 1: ""}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    full = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=10, n=2, temperature=1.0, seed=3, **LONG
    )
    assert texts == {c.index: c.text for c in full.choices}


def test_stop_string_and_stop_token(client, offline):
    full, ids = offline_text(offline, PROMPT, 24)
    stop = full[6:8]
    assert len(stop) == 2
    r = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=24, stop=[stop], **GREEDY, **LONG
    )
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    stop_id = ids[5]
    r = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=24, **GREEDY,
        extra_body={"stop_token_ids": [stop_id], "ignore_eos": True},
    )  # fmt: skip
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == ids.index(stop_id) + 1


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=8, logprobs=True, top_logprobs=3,
        **GREEDY, **LONG,
    )  # fmt: skip
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 8
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3
        assert tops == sorted(tops, reverse=True)
        assert entry.logprob == pytest.approx(tops[0], abs=1e-6)  # greedy = the most likely
        assert entry.token == entry.top_logprobs[0].token
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert sum(math.exp(t) for t in tops) <= 1.0 + 1e-5
    assert "".join(e.token for e in content) == r.choices[0].message.content or any(
        "\ufffd" in e.token for e in content
    )


def test_completion_logprobs_stream_equals_non_stream(client):
    kwargs = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, logprobs=2, **GREEDY, **LONG)
    full = client.completions.create(**kwargs).choices[0].logprobs
    assert len(full.tokens) == len(full.token_logprobs) == len(full.top_logprobs) == 6
    for token, lp, top in zip(full.tokens, full.token_logprobs, full.top_logprobs):
        assert 1 <= len(top) <= 3 and top[token] == pytest.approx(lp)
        assert lp == pytest.approx(max(top.values()))
    assert full.text_offset[0] == 0
    tokens, lps = [], []
    for chunk in client.completions.create(stream=True, **kwargs):
        if chunk.choices and chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.tokens
            lps += chunk.choices[0].logprobs.token_logprobs
    assert tokens == full.tokens
    assert lps == pytest.approx(full.token_logprobs)


def test_models_tokenize_detokenize_version_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    ids = tokenize(server, prompt="hello kestrel", add_special_tokens=False)
    r = httpx.post(server.url + "/detokenize", json={"tokens": ids}, timeout=10)
    assert r.json() == {"prompt": "hello kestrel"}
    r = httpx.post(server.url + "/tokenize", json={"prompt": "hello"}, timeout=10).json()
    assert r["max_model_len"] == MAX_MODEL_LEN and r["count"] == len(r["tokens"])
    assert httpx.get(server.url + "/version", timeout=10).json()["version"]
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_default_max_tokens_fills_the_context(client, server):
    prompt_len = len(tokenize(server, messages=MESSAGES))
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, **GREEDY, **LONG)
    assert r.usage.completion_tokens == MAX_MODEL_LEN - prompt_len
    assert r.choices[0].finish_reason == "length"
