"""64 simultaneous streaming requests: each completes with its own text (equal to the offline
engine's greedy text for its prompt), nothing mixed up between streams."""

from __future__ import annotations

import asyncio

from kestrel import SamplingParams
from tests.server.harness import MODEL_NAME

NUM_REQUESTS = 64
MAX_TOKENS = 12


def test_64_simultaneous_streams(server, offline):
    from openai import AsyncOpenAI

    prompts = [f"Request {i}: the kestrel number {i * 7 % 64} hovers" for i in range(NUM_REQUESTS)]

    async def one(client: AsyncOpenAI, prompt: str) -> tuple[str, str | None, int]:
        stream = await client.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
            stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        text, finish, tokens = "", None, -1
        async for chunk in stream:
            for choice in chunk.choices:
                assert choice.index == 0
                text += choice.text
                finish = choice.finish_reason or finish
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return text, finish, tokens

    async def run_all() -> list[tuple[str, str | None, int]]:
        async with AsyncOpenAI(
            base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120
        ) as client:
            return await asyncio.wait_for(
                asyncio.gather(*(one(client, p) for p in prompts)), timeout=180
            )

    results = asyncio.run(run_all())
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    expected = [o.outputs[0].text for o in offline.generate(prompts, params, use_tqdm=False)]
    assert len(set(expected)) > NUM_REQUESTS // 2  # the prompts lead to different texts
    for i, (text, finish, tokens) in enumerate(results):
        assert (text, finish, tokens) == (expected[i], "length", MAX_TOKENS), f"request {i}"
    samples = server.metrics()
    assert samples['kestrel:num_requests_running{model_name="tiny"}'] == 0
