"""Time of one schedule() + update() of the native scheduler, called from Python.

Workloads: (1) N running decodes; (2) the same decodes plus prefill chunks of newly arriving
prompts under a token budget. Reports the median and p99 over many steps, in microseconds, and
writes JSON. Target (issue 2): < 50 us for 256 decodes.

    python benchmarks/scheduler_overhead.py [--num-decodes 256] [--steps 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
from kestrel._core import Scheduler, SchedulerConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit


def _make(num_decodes: int, prompt_len: int, budget: int) -> Scheduler:
    cfg = SchedulerConfig(
        num_blocks=200_000,
        block_size=16,
        max_num_seqs=num_decodes + 64,
        max_num_batched_tokens=budget,
        max_model_len=32_768,
        enable_prefix_caching=True,
    )
    sched = Scheduler(cfg)
    rng = np.random.default_rng(0)
    for i in range(num_decodes):
        prompt = rng.integers(0, 32_000, size=prompt_len)
        sched.add_request(f"d{i}", prompt, max_tokens=30_000, ignore_eos=True)
    # Run until every request is decoding (prefills done).
    while True:
        out = sched.schedule()
        sched.update(np.ones(out.num_sampled, dtype=np.int64))
        if out.num_decodes == num_decodes and out.num_reqs == num_decodes:
            return sched


def _time_steps(sched: Scheduler, steps: int, arrivals: int, prompt_len: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    times = np.empty(steps)
    sampled_buf = np.ones(4096, dtype=np.int64)
    arrived = 0
    for k in range(steps):
        for _ in range(arrivals):
            sched.add_request(f"p{arrived}", rng.integers(0, 32_000, size=prompt_len), max_tokens=1)
            arrived += 1
        t0 = time.perf_counter()
        out = sched.schedule()
        sched.update(sampled_buf[: out.num_sampled])
        times[k] = time.perf_counter() - t0
    return times * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-decodes", type=int, default=256)
    ap.add_argument("--context", type=int, default=1024, help="prompt length of the decodes")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args()

    rows = []
    sched = _make(args.num_decodes, args.context, budget=args.num_decodes + 1024)
    t = _time_steps(sched, args.steps, arrivals=0, prompt_len=0)
    rows.append((f"{args.num_decodes} decodes", t))
    sched = _make(args.num_decodes, args.context, budget=args.num_decodes + 1024)
    # Two 512-token prompts arrive per step, each prefilled in one chunk alongside the decodes.
    t = _time_steps(sched, args.steps, arrivals=2, prompt_len=512)
    rows.append((f"{args.num_decodes} decodes + 1024 prefill tokens", t))

    print(
        f"\nscheduler_overhead  commit={commit()}  cpu={platform.processor() or platform.machine()}"
        f"  context={args.context}  steps={args.steps}"
    )
    print(f"{'workload':<40} {'median us':>10} {'p99 us':>10}")
    results = []
    for name, t in rows:
        med, p99 = float(np.median(t)), float(np.percentile(t, 99))
        print(f"{name:<40} {med:>10.1f} {p99:>10.1f}")
        results.append({"workload": name, "median_us": med, "p99_us": p99})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "commit": commit(),
                    "machine": platform.node(),
                    "context": args.context,
                    "steps": args.steps,
                    "results": results,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
