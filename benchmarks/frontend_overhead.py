"""Host cost of the API process per streamed token, without a model or a socket.

Feeds an `MPAsyncEngine` (the client of the engine core) the core's messages for N running
requests over T steps, one token each per step (msgpack frames as the core encodes them), and
times, per token: (1) decoding a frame and folding the deltas into RequestOutputs
(detokenization, stop-string hold-back, stream queues), and (2) turning those outputs into the
server's `text_completion` SSE chunks. HTTP writes are not included (measured end to end by
`benchmarks/serving.py`).

    python benchmarks/frontend_overhead.py --tokenizer .peers/ggml-vocab-qwen2.gguf \\
        [--num-requests 256] [--steps 128] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from kestrel.engine import core_protocol as cp
from kestrel.engine.core_client import MPAsyncEngine
from kestrel.engine.request_stream import _ACCEPTED, RequestStream
from kestrel.sampling_params import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit


def _tokenizer(path: str):
    from kestrel.loader.gguf_loader import GGUFFile
    from kestrel.loader.gguf_tokenizer import load_gguf_tokenizer
    from kestrel.tokenizer import Tokenizer

    if path.endswith(".gguf"):
        return load_gguf_tokenizer(GGUFFile(Path(path)))
    return Tokenizer.from_dir(Path(path))


async def _run(args: argparse.Namespace) -> dict:
    from kestrel_server.completions import _CompletionEvents, _Shown

    tokenizer = _tokenizer(args.tokenizer)
    vocab = tokenizer.vocab_size if hasattr(tokenizer, "vocab_size") else 32_000
    params = SamplingParams(temperature=0.0, max_tokens=args.steps, stop=args.stop or None)
    facts = cp.CoreFacts("bench", 4096, vocab, args.num_requests, cp.params_to_wire(params), {}, 0)
    engine = MPAsyncEngine(facts, tokenizer, "ipc:///dev/null")
    engine._started = True  # no sockets: frames are handed to _on_outputs directly
    rng = np.random.default_rng(0)
    ids = [f"r{i}" for i in range(args.num_requests)]
    streams: list[RequestStream] = []
    for rid in ids:
        prompt = rng.integers(100, min(vocab, 30_000), size=32).tolist()
        from kestrel.engine.output_processor import RequestOutputProcessor

        engine._requests[rid] = RequestOutputProcessor(rid, None, prompt, params, tokenizer, 0.0)
        stream = RequestStream(rid, engine, 1)
        engine._streams[rid] = stream
        streams.append(stream)
    engine._on_outputs(cp.CoreOutputs(replies=[cp.Reply(r) for r in ids]))
    for s in streams:
        assert await s._queue.get() is _ACCEPTED
    # The core's frames, encoded up front (their encoding is the core's cost, not ours).
    tokens = rng.integers(100, min(vocab, 30_000), size=(args.steps, args.num_requests))
    frames = []
    for t in range(args.steps):
        last = t == args.steps - 1
        deltas = [
            cp.RequestDelta(
                rid,
                [cp.SampleDelta(0, [int(tokens[t, i])], "length" if last else None)],
                finished=last,
            )
            for i, rid in enumerate(ids)
        ]
        frames.append(cp.output_encoder.encode(cp.CoreOutputs(deltas=deltas)))
    shown = _Shown(vllm_k=None, echo_k=None, score_only=False)
    events = [_CompletionEvents(None, rid, "bench", 1, None, [""], shown) for rid in ids]  # type: ignore[arg-type]
    fold_s = sse_s = 0.0
    chunks = 0
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    for frame in frames:
        t0 = time.perf_counter()
        engine._on_outputs(cp.output_decoder.decode(frame))
        outputs = [await s.__anext__() for s in streams]
        t1 = time.perf_counter()
        for ev, out in zip(events, outputs):
            if ev.chunk_for(0, out) is not None:
                chunks += 1
        sse_s += time.perf_counter() - t1
        fold_s += t1 - t0
    if profiler is not None:
        import pstats

        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    n = args.steps * args.num_requests
    return {
        "commit": commit(),
        "host": platform.node(),
        "num_requests": args.num_requests,
        "steps": args.steps,
        "tokens": n,
        "chunks": chunks,
        "fold_us_per_token": 1e6 * fold_s / n,
        "sse_us_per_token": 1e6 * sse_s / n,
        "total_us_per_token": 1e6 * (fold_s + sse_s) / n,
        "tokens_per_s_one_api_process": n / (fold_s + sse_s),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True, help="a .gguf file or a tokenizer directory")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--stop", nargs="*", default=None, help="stop strings (held back, searched)")
    p.add_argument("--json", default=None)
    p.add_argument("--profile", action="store_true", help="cProfile the timed loop")
    args = p.parse_args(argv)
    result = asyncio.run(_run(args))
    for k, v in result.items():
        print(f"{k:32s} {v:.2f}" if isinstance(v, float) else f"{k:32s} {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
