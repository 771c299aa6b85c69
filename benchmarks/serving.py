"""Serving benchmark: a streaming load generator for any OpenAI-compatible server.

For each (request rate, max concurrency) pair it sends `--num-prompts` streaming requests
(Poisson arrivals at the rate; `inf` = all at once), at most `--max-concurrency` in flight, and
reports per request: TTFT (send -> first token), TPOT ((e2e - TTFT) / (output tokens - 1)),
ITL (gaps between streamed chunks) and end-to-end latency, as mean/p50/p90/p99, plus request and
token throughput. Prints a table and writes JSON (`--out`).

    kestrel serve MODEL &
    python benchmarks/serving.py --base-url http://127.0.0.1:8000 \\
        --request-rate 1 4 inf --max-concurrency 16 --num-prompts 64 --out serving.json

Prompts are random words (about one token each for common tokenizers), so nothing is
downloaded; `ignore_eos` (a vLLM/Kestrel extension) keeps output lengths fixed.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import math
import multiprocessing
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit
from sse_client import HTTPStatusError, SSEClient

_WORDS = [
    "the",
    "kestrel",
    "hovers",
    "over",
    "open",
    "fields",
    "and",
    "hunts",
    "small",
    "mammals",
    "insects",
    "birds",
    "while",
    "wind",
    "carries",
    "it",
    "above",
    "hills",
    "rivers",
    "towns",
    "roads",
    "farms",
    "forests",
    "each",
    "morning",
    "evening",
    "season",
    "year",
]


@dataclass
class RequestResult:
    ok: bool
    output_tokens: int = 0
    ttft_s: float = float("nan")
    e2e_s: float = float("nan")
    itl_s: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot_s(self) -> float:
        if self.output_tokens < 2:
            return float("nan")
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def make_prompts(n: int, input_len: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        f"{i}: " + " ".join(rng.choice(_WORDS) for _ in range(max(1, input_len - 2)))
        for i in range(n)
    ]


def request_body(args: argparse.Namespace, model: str, prompt: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": args.output_len,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def chunk_text(chunk: dict[str, Any]) -> str:
    text = ""
    for choice in chunk.get("choices") or []:
        if "delta" in choice:
            text += choice["delta"].get("content") or ""
        else:
            text += choice.get("text") or ""
    return text


class _Timing:
    """Folds one stream's SSE events into a RequestResult."""

    def __init__(self, result: RequestResult, start: float) -> None:
        self.result, self.last, self.chunks = result, start, 0
        self.start = start

    def event(self, payload: str) -> bool:
        """One `data:` payload; False once the stream reported an error."""
        result = self.result
        chunk = json.loads(payload)
        if "error" in chunk:
            result.error = str(chunk["error"])
            return False
        now = time.perf_counter()
        if chunk_text(chunk):
            self.chunks += 1
            if math.isnan(result.ttft_s):
                result.ttft_s = now - self.start
            else:
                result.itl_s.append(now - self.last)
            self.last = now
        if chunk.get("usage"):
            result.output_tokens = chunk["usage"]["completion_tokens"]
        return True


async def one_request(
    http: httpx.AsyncClient | SSEClient, url: str, body: dict[str, Any], headers: dict[str, str]
) -> RequestResult:
    """`url`: the full URL for httpx, the path for the raw client."""
    result = RequestResult(ok=False)
    start = time.perf_counter()
    timing = _Timing(result, start)
    try:
        if isinstance(http, SSEClient):
            lines = http.stream_lines(url, json.dumps(body).encode(), headers)
            async with contextlib.aclosing(lines):
                async for raw in lines:
                    if not raw.startswith(b"data: ") or raw == b"data: [DONE]":
                        continue
                    if not timing.event(raw[6:].decode()):
                        return result
        else:
            async with http.stream("POST", url, json=body, headers=headers) as response:
                if response.status_code != 200:
                    body_text = (await response.aread())[:200]
                    result.error = f"HTTP {response.status_code}: {body_text!r}"
                    return result
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    if not timing.event(line[6:]):
                        return result
    except (httpx.HTTPError, json.JSONDecodeError, HTTPStatusError, OSError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    except asyncio.TimeoutError:
        result.error = "timed out"
        return result
    chunks = timing.chunks
    result.e2e_s = time.perf_counter() - start
    result.output_tokens = result.output_tokens or chunks
    result.ok = not math.isnan(result.ttft_s)
    if not result.ok:
        result.error = "no token was streamed"
    return result


async def _run_shard(
    args: argparse.Namespace,
    model: str,
    rate: float,
    concurrency: int | None,
    prompts: list[str],
    seed: int,
) -> tuple[list[RequestResult], float, float]:
    """One client's share: its results and its (start, end) on the shared wall clock."""
    path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
    url = path if args.client == "raw" else args.base_url.rstrip("/") + path
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    rng = random.Random(seed)
    limit = asyncio.Semaphore(concurrency or len(prompts))
    async with _client(args) as http:
        for _ in range(args.warmup):
            await one_request(http, url, request_body(args, model, prompts[0]), headers)

        async def limited(prompt: str) -> RequestResult:
            async with limit:
                return await one_request(http, url, request_body(args, model, prompt), headers)

        tasks = []
        start = time.time()
        for prompt in prompts:
            tasks.append(asyncio.create_task(limited(prompt)))
            if math.isfinite(rate):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        end = time.time()
    return list(results), start, end


@contextlib.asynccontextmanager
async def _client(args: argparse.Namespace):
    if args.client == "raw":
        client = SSEClient(args.base_url, args.timeout)
        try:
            yield client
        finally:
            await client.close()
        return
    timeout = httpx.Timeout(args.timeout, connect=30.0)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        yield http


def _shard_main(*shard_args: Any) -> tuple[list[RequestResult], float, float]:
    try:
        import uvloop

        return uvloop.run(_run_shard(*shard_args))
    except ImportError:
        return asyncio.run(_run_shard(*shard_args))


async def run_scenario(
    args: argparse.Namespace, model: str, rate: float, concurrency: int | None
) -> dict[str, Any]:
    """One (rate, concurrency) scenario. With --num-clients K the prompts, the rate and the
    concurrency are split over K client processes (one Python client tops out near 10k
    streamed chunks/s, below what a server may deliver), and their results are merged."""
    prompts = make_prompts(args.num_prompts, args.input_len, args.seed)
    k = max(1, min(args.num_clients, len(prompts)))
    if k == 1:
        results, start, end = await _run_shard(
            args, model, rate, concurrency, prompts, args.seed + 1
        )
        return summarize(results, end - start, rate, concurrency)
    shard_conc = None if not concurrency else max(1, concurrency // k)
    loop = asyncio.get_running_loop()
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(k, mp_context=ctx) as pool:
        futures = []
        for i in range(k):
            shard = (args, model, rate / k, shard_conc, prompts[i::k], args.seed + 1 + i)
            futures.append(loop.run_in_executor(pool, _shard_main, *shard))
        shards = await asyncio.gather(*futures)
    results = [r for shard, _, _ in shards for r in shard]
    duration = max(e for _, _, e in shards) - min(s for _, s, _ in shards)
    return summarize(results, duration, rate, concurrency)


def percentiles(values: list[float]) -> dict[str, float]:
    values = sorted(v for v in values if not math.isnan(v))
    if not values:
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan"), "p99": float("nan")}

    def pct(q: float) -> float:
        pos = (len(values) - 1) * q
        lo, hi = math.floor(pos), math.ceil(pos)
        return values[lo] + (values[hi] - values[lo]) * (pos - lo)

    return {"mean": sum(values) / len(values), "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99)}


def summarize(
    results: list[RequestResult], duration: float, rate: float, concurrency: int | None
) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)

    def to_ms(stats: dict[str, float]) -> dict[str, float]:
        return {k: v * 1000.0 for k, v in stats.items()}

    return {
        "request_rate": "inf" if math.isinf(rate) else rate,
        "max_concurrency": concurrency,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput_tok_s": output_tokens / duration if duration > 0 else 0.0,
        "total_output_tokens": output_tokens,
        "ttft_ms": to_ms(percentiles([r.ttft_s for r in ok])),
        "tpot_ms": to_ms(percentiles([r.tpot_s for r in ok])),
        "itl_ms": to_ms(percentiles([gap for r in ok for gap in r.itl_s])),
        "e2e_ms": to_ms(percentiles([r.e2e_s for r in ok])),
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    header = ["rate", "conc", "ok", "fail", "req/s", "out tok/s"]
    for name in ("ttft", "tpot", "itl", "e2e"):
        header += [f"{name} p50", f"{name} p90", f"{name} p99"]
    cells = [header]
    for r in rows:
        line = [str(r["request_rate"]), str(r["max_concurrency"] or "-"), str(r["completed"]),
                str(r["failed"]), f"{r['request_throughput']:.2f}",
                f"{r['output_throughput_tok_s']:.1f}"]  # fmt: skip
        for name in ("ttft", "tpot", "itl", "e2e"):
            line += [f"{r[f'{name}_ms'][q]:.1f}" for q in ("p50", "p90", "p99")]
        cells.append(line)
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print("latencies in ms")
    for k, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if k == 0:
            print("  ".join("-" * w for w in widths))
    for r in rows:
        for error in r["errors"]:
            print(f"failed (rate {r['request_rate']}, concurrency {r['max_concurrency']}): {error}")


def server_facts(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    base = args.base_url.rstrip("/")
    facts: dict[str, Any] = {}
    with httpx.Client(timeout=30) as http:
        models = http.get(base + "/v1/models", headers=headers)
        models.raise_for_status()
        model = args.model or models.json()["data"][0]["id"]
        version = http.get(base + "/version")
        if version.status_code == 200:
            facts["server_version"] = version.json()
    return model, facts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--model", default=None, help="default: the server's first model")
    p.add_argument(
        "--api-key", default=os.environ.get("KESTREL_API_KEY") or os.environ.get("OPENAI_API_KEY")
    )
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128, help="prompt length in words")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens of each request")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--request-rate", type=float, nargs="+", default=[math.inf],
        help="requests per second (Poisson arrivals); inf = all at once",
    )  # fmt: skip
    p.add_argument(
        "--max-concurrency", type=int, nargs="+", default=[0],
        help="most requests in flight (0 = unlimited)",
    )  # fmt: skip
    p.add_argument(
        "--num-clients", type=int, default=1,
        help="client processes sharing the load (prompts, rate and concurrency split evenly)",
    )  # fmt: skip
    p.add_argument(
        "--client", choices=("raw", "httpx"), default="raw",
        help="raw: the benchmark's own HTTP/1.1 SSE reader (sse_client.py; several times "
        "cheaper per chunk than httpx, so the client is not what is measured); httpx",
    )  # fmt: skip
    p.add_argument("--warmup", type=int, default=1, help="requests sent before each scenario")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON output path")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    model, facts = server_facts(args)
    rows = []
    for rate in args.request_rate:
        for concurrency in args.max_concurrency:
            rows.append(asyncio.run(run_scenario(args, model, rate, concurrency or None)))
    print_table(rows)
    payload = {
        "benchmark": "serving",
        "commit": commit(),
        "base_url": args.base_url,
        "model": model,
        **facts,
        "workload": {k: v for k, v in vars(args).items() if k not in ("api_key", "out")},
        "results": rows,
    }
    payload["workload"]["request_rate"] = ["inf" if math.isinf(r) else r for r in args.request_rate]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
