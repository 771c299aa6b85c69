"""Where the time of a decode step goes: host work (schedule, update, bookkeeping) vs the GPU
(CUDA events around the forward), plus the top GPU kernels from torch.profiler.

    python benchmarks/profile_decode.py --model qwen2.5-7b --batch-size 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, device_name, model_dir_for, print_table


class _Timed:
    """Delegates to `inner`, timing the named methods into `sink[name]` (seconds)."""

    def __init__(self, inner, names, sink):
        self._inner, self._names, self._sink = inner, set(names), sink

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if name not in self._names:
            return attr

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self._sink.setdefault(name, []).append(time.perf_counter() - t0)

        return timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-7b")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()

    from kestrel import LLM, SamplingParams

    model_dir, dummy = model_dir_for(args.model)
    llm = LLM(
        model_dir,
        load_format="dummy" if dummy else "auto",
        dtype="bfloat16",
        max_model_len=1024,
        max_num_seqs=max(8, args.batch_size),
    )
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=args.steps + 20, ignore_eos=True)
    for b in range(args.batch_size):
        engine.add_request(f"p{b}", list(range(100, 228)), params)
    for _ in range(10):  # prefill + warm-up decodes
        engine.step()

    sink: dict[str, list[float]] = {}
    engine.scheduler = _Timed(engine.scheduler, ["schedule", "update"], sink)
    # Steps reach the runner through the executor, which holds its own reference.
    engine.runner = engine.executor.runner = _Timed(engine.runner, ["launch"], sink)
    graphs = engine.runner._inner.graphs
    gpu_ms: list[float] = []
    if graphs is not None:
        run = graphs.run

        def run_with_events(out, input_ids, stage):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            logits = run(out, input_ids, stage)
            end.record()
            gpu_ms.append((start, end))
            return logits

        graphs.run = run_with_events
    totals = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        engine.step()
        totals.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    gpu = [s.elapsed_time(e) for s, e in gpu_ms]
    med = {k: 1e3 * statistics.median(v) for k, v in sink.items()}
    total = 1e3 * statistics.median(totals)
    rows = [
        ["step (wall)", total],
        ["  scheduler.schedule", med.get("schedule", 0.0)],
        ["  runner.launch (enqueue; GPU wait under --no-async-scheduling)", med.get("launch", 0.0)],
        ["    GPU: graph replay (events)", statistics.median(gpu) if gpu else float("nan")],
        ["  scheduler.update", med.get("update", 0.0)],
        [
            "  engine bookkeeping (rest)",
            total - med.get("schedule", 0) - med.get("launch", 0) - med.get("update", 0),
        ],
    ]
    print_table(
        f"decode step profile  model={args.model} batch={args.batch_size} "
        f"device={device_name()} commit={commit()}",
        ["part", "median ms"],
        rows,
    )

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            engine.step()
        torch.cuda.synchronize()
    print("\ntop GPU kernels over 10 steps:")
    print(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60)
    )


if __name__ == "__main__":
    main()
