"""RequestStream: a reader that fell behind gets the queued outputs joined into one."""

from __future__ import annotations

import asyncio

import pytest

from kestrel.engine.request_stream import RequestFailedError, RequestStream
from kestrel.outputs import CompletionOutput, RequestMetrics, RequestOutput


class _Owner:
    def _abort(self, request_id: str) -> None:
        pass


def _output(texts: list[str], ids: list[list[int]], finished: bool) -> RequestOutput:
    outs = [
        CompletionOutput(
            index=i,
            text="".join(texts[: k + 1]),
            token_ids=[t for chunk in ids[: k + 1] for t in chunk],
            finish_reason="length" if finished else None,
            text_delta=texts[k],
            token_ids_delta=ids[k],
        )
        for i, k in enumerate([len(texts) - 1])
    ]
    return RequestOutput("r", None, [1], outs, finished, RequestMetrics(0.0))


def test_queued_outputs_are_joined_and_an_error_comes_after_them():
    async def main():
        stream = RequestStream("r", _Owner())
        texts, ids = ["a", "b", "c"], [[1], [2], [3]]
        for k in range(3):
            stream._put(_output(texts[: k + 1], ids[: k + 1], False))
        stream._put(RequestFailedError("late failure"))
        first = await stream.__anext__()
        with pytest.raises(RequestFailedError):
            await stream.__anext__()
        return first, stream.finished

    first, finished = asyncio.run(main())
    c = first.outputs[0]
    assert c.text_delta == "abc" and c.token_ids_delta == [1, 2, 3] and c.text == "abc"
    assert finished


def test_joining_stops_at_the_final_output():
    async def main():
        stream = RequestStream("r", _Owner())
        stream._put(_output(["a"], [[1]], False))
        stream._put(_output(["a", "b"], [[1], [2]], True))
        return [o async for o in stream]

    outs = asyncio.run(main())
    assert len(outs) == 1 and outs[0].finished
    assert outs[0].outputs[0].text_delta == "ab" and outs[0].outputs[0].token_ids_delta == [1, 2]
