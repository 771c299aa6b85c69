"""Where a new request's time to first token goes: `add_request`, then each engine step until
its first token, timed on the host (with the device synchronized after each call), and the
top host-side ops of the step that runs its prefill (torch.profiler, CPU time).

Each request has a fresh random prompt (no prefix-cache hits). With overlap scheduling the
first token comes out of the step after the prefill's.

    python benchmarks/profile_ttft.py --model qwen2.5-0.5b [--input-len 128] [--no-async-scheduling]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, device_name, model_dir_for


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    from kestrel import LLM, SamplingParams

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument(
        "--piecewise-graph-max-tokens", type=int, default=2048, help="0: prefill steps eager"
    )
    args = ap.parse_args(argv)
    model_dir, dummy = model_dir_for(args.model)
    kwargs = {
        "max_model_len": args.input_len + 64,
        "max_num_seqs": 16,
        "piecewise_graph_max_tokens": args.piecewise_graph_max_tokens,
    }
    if dummy:
        kwargs["load_format"] = "dummy"
    llm = LLM(model_dir, async_scheduling=args.async_scheduling, **kwargs)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)

    def prompt() -> list[int]:
        high = min(20000, engine.model_config.vocab_size)
        return torch.randint(3, high, (args.input_len,), generator=gen).tolist()

    # Warm-up: a few requests through to the end.
    for i in range(3):
        engine.add_request(f"warm-{i}", prompt(), params)
    while engine.has_unfinished_requests():
        engine.step()
    adds, steps_to_first, ttfts, step_ms = [], [], [], []
    for r in range(args.requests):
        _sync()
        t0 = time.perf_counter()
        engine.add_request(f"r{r}", prompt(), params)
        t1 = time.perf_counter()
        adds.append(t1 - t0)
        n = 0
        while True:
            s0 = time.perf_counter()
            outs = engine.step()
            _sync()
            step_ms.append((n, 1e3 * (time.perf_counter() - s0)))
            n += 1
            if any(o.outputs[0].token_ids for o in outs):
                break
        ttfts.append(time.perf_counter() - t0)
        steps_to_first.append(n)
        while engine.has_unfinished_requests():
            engine.step()
    print(f"profile_ttft  device={device_name()}  model={args.model}  commit={commit()}")
    print(f"  add_request      p50 {1e3 * statistics.median(adds):8.3f} ms")
    print(f"  steps to first   {steps_to_first}")
    for k in range(max(steps_to_first)):
        ms = [m for i, m in step_ms if i == k]
        print(f"  step {k}           p50 {statistics.median(ms):8.3f} ms  ({len(ms)} samples)")
    print(f"  TTFT             p50 {1e3 * statistics.median(ttfts):8.3f} ms")
    # Python's view of the prefill steps' host time (which kestrel functions spend it).
    import cProfile
    import pstats

    prof_py = cProfile.Profile()
    for r in range(args.requests):
        engine.add_request(f"py{r}", prompt(), params)
        prof_py.enable()
        engine.step()
        _sync()
        prof_py.disable()
        while engine.has_unfinished_requests():
            engine.step()
    stats = pstats.Stats(prof_py)
    stats.sort_stats("tottime").print_stats(args.top)
    stats.sort_stats("cumtime").print_stats("kestrel", args.top)
    # The prefill step under the profiler (host CPU time per op).
    engine.add_request("prof", prompt(), params)
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
    )
    with profile(activities=activities, with_stack=True) as prof:
        engine.step()
        _sync()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    # The same, by the kestrel call site (host time of ops called from each place).
    print(
        prof.key_averages(group_by_stack_n=6).table(
            sort_by="cpu_time_total", row_limit=args.top, max_name_column_width=40
        )
    )
    while engine.has_unfinished_requests():
        engine.step()


if __name__ == "__main__":
    main()
