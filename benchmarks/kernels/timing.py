"""Timing helpers for the kernel benchmarks: CUDA-graph replay timing (removes Python launch
gaps), event timing for code that cannot be captured, and the two device ceilings."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def time_events(fn: Callable[[], object], iters: int = 20, warmup: int = 3) -> float:
    """Median seconds per call over `iters` calls, each timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def time_graph(
    fns: list[Callable[[], object]], calls_per_replay: int = 1, replays: int = 7
) -> float:
    """Median seconds per call: the calls in `fns` (cycled to defeat the L2 cache when they
    read different buffers) are captured `calls_per_replay` times into one CUDA graph, which is
    replayed `replays` times after a warm-up. Falls back to event timing if capture fails."""
    sequence = [fns[i % len(fns)] for i in range(max(calls_per_replay, len(fns)))]
    for fn in fns:  # eager warm-up: workspaces, lazy module loads
        fn()
    torch.cuda.synchronize()
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            for fn in sequence:
                fn()
        torch.cuda.current_stream().wait_stream(stream)
    except RuntimeError:
        torch.cuda.synchronize()
        return statistics.median(time_events(fn) for fn in fns)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(sequence))
    return statistics.median(times)


def copy_bandwidth(num_bytes: int = 2 << 30) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    src = torch.randn(num_bytes // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    seconds = time_events(lambda: dst.copy_(src), iters=10)
    return 2 * num_bytes / seconds


def gemm_flops(n: int = 8192) -> float:
    """bf16 n x n x n matrix product rate (FLOP/s) on random data, through torch (cuBLAS)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    seconds = time_events(lambda: a @ b, iters=10)
    return 2 * n**3 / seconds
