"""The streamed completion chunks of echo + logprobs, built from hand-made RequestOutputs: the
prompt's logprobs come first, and a sample that runs ahead of the scored one is held back, not
dropped."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from kestrel.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from kestrel_server.completions import _CompletionEvents, _Shown

PROMPT = [7, 8, 9]
PROMPT_LPS = [
    None,
    {8: Logprob(-1.0, 1, "i")},
    {9: Logprob(-2.0, 2, "j"), 4: Logprob(-0.5, 1, "e")},
]


class _Tokenizer:
    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def _sample(index, ids, new, text, delta, finish=None):
    entries = [{t: Logprob(-0.1 * (j + 1), 1, None)} for j, t in enumerate(ids)]
    return CompletionOutput(index, text, ids, finish, None, entries, delta, new)


def _output(samples, scored):
    return RequestOutput(
        "r", "hij", PROMPT, samples, all(s.finished for s in samples), RequestMetrics(0.0),
        prompt_logprobs=PROMPT_LPS if scored else None,
    )  # fmt: skip


def _chunks(outputs):
    state = SimpleNamespace(engine=SimpleNamespace(tokenizer=_Tokenizer()))
    events = _CompletionEvents(state, "r", "m", 2, 1, ["hij"], _Shown(None, 1, False))

    async def feed():
        for o in outputs:
            yield 0, o

    async def collect():
        return [json.loads(e[len("data: ") :]) async for e in events.run(feed(), False)]

    return asyncio.run(collect())


def test_a_sample_ahead_of_the_scored_one_is_held_then_sent_whole():
    outputs = [
        # Sample 1 got two tokens before sample 0's prefill (and the prompt's scoring) ended.
        _output([_sample(0, [], [], "", ""), _sample(1, [1, 2], [1, 2], "bc", "bc")], False),
        _output([_sample(0, [3], [3], "d", "d"), _sample(1, [1, 2, 3], [3], "bcd", "d", "length")], True),
        _output(
            [_sample(0, [3, 4], [4], "de", "e", "length"), _sample(1, [1, 2, 3], [], "bcd", "", "length")],
            True,
        ),
    ]  # fmt: skip
    chunks = _chunks(outputs)
    by_index = {0: [], 1: []}
    for chunk in chunks:
        for choice in chunk["choices"]:
            by_index[choice["index"]].append(choice)
    one = by_index[1]
    assert "".join(c["text"] for c in one) == "hijbcd"
    lp = one[0]["logprobs"]
    # The prompt (first token null), then the held tokens, offsets after the echoed prompt.
    assert lp["token_logprobs"][:3] == [None, -1.0, -2.0]
    assert lp["top_logprobs"][0] is None
    assert lp["tokens"] == ["h", "i", "j", "b", "c", "d"]
    assert lp["text_offset"] == [0, 1, 2, 3, 4, 5]
    assert lp["token_logprobs"][3:] == pytest.approx([-0.1, -0.2, -0.3])
    assert one[-1]["finish_reason"] == "length"
    zero = by_index[0]
    assert "".join(c["text"] for c in zero) == "hijde"
    assert zero[0]["logprobs"]["tokens"][:3] == ["h", "i", "j"]
