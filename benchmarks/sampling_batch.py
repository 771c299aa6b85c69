"""Host time per step of making the sampler's SamplingBatch: rebuilt from Python lists
(`SamplingBatch.build`, the runner before the persistent batch) vs gathered from the runner's
persistent `InputBatch` (one `append_tokens` of the step's new tokens + `gather`).

Workloads, each at batch sizes 1, 64 and 256 (every row sampled every step):
  mixed       rows cycle through plain greedy, seeded top-p/top-k sampling, logit bias,
              min_tokens, and repetition/presence/frequency penalties (1 row in 5 penalized)
  no-penalty  the same without the penalized rows (no dense [S, V] state either way)
  greedy      every row plain greedy: the runner's fast path (argmax only; the old check was
              `all(row.plain_greedy for row in rows)`, the new one is O(1), plus the append)
Each step appends one token to every row first (outputs grow as in decode). Prints the median
and p99 in microseconds and the dense penalty memory, and writes JSON.

    python benchmarks/sampling_batch.py [--vocab 152064] [--steps 200] [--device cpu] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kestrel.runner import InputBatch
from kestrel.sample import SamplingBatch
from kestrel.sampling_params import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit

EOS = (2,)


def _params(kind: str, i: int, vocab: int) -> SamplingParams:
    if kind == "greedy":
        return SamplingParams(temperature=0, max_tokens=None)
    kinds = ["greedy", "seeded", "bias", "min_tokens", "penalty"]
    if kind == "no-penalty":
        kinds = kinds[:-1]
    pick = kinds[i % len(kinds)]
    if pick == "greedy":
        return SamplingParams(temperature=0, max_tokens=None)
    if pick == "seeded":
        return SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=i, max_tokens=None)
    if pick == "bias":
        bias = {(37 * i + j) % vocab: 1.5 for j in range(4)}
        return SamplingParams(temperature=0.7, logit_bias=bias, logprobs=2, max_tokens=None)
    if pick == "min_tokens":
        return SamplingParams(
            temperature=1.0, min_tokens=10**6, stop_token_ids=[5, 6], max_tokens=None
        )
    return SamplingParams(
        temperature=0.9, repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.2
    )


class _OldRow:
    """The per-row record the old runner rebuilt the batch from."""

    def __init__(self, params: SamplingParams, prompt: list[int], output: list[int]) -> None:
        self.params, self.prompt, self.output = params, prompt, output
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed else None
        p = params
        self.plain_greedy = (
            p.is_greedy
            and p.logprobs is None
            and not p.logit_bias
            and p.min_tokens == 0
            and (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
        )


def _run(kind: str, num_rows: int, args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(num_rows)
    device = torch.device(args.device)
    rows = [
        _OldRow(
            _params(kind, i, args.vocab),
            rng.integers(3, args.vocab, args.prompt_len).tolist(),
            rng.integers(3, args.vocab, args.output_len).tolist(),
        )
        for i in range(num_rows)
    ]
    batch = InputBatch(max(num_rows, 256), args.vocab, device)
    slots = [
        batch.add(i, r.params, r.prompt, r.generator, EOS, r.output) for i, r in enumerate(rows)
    ]
    old = np.empty(args.steps)
    new = np.empty(args.steps)
    for step in range(args.steps):
        tokens = rng.integers(3, args.vocab, num_rows, dtype=np.int32)  # as update() gives
        for r, t in zip(rows, tokens.tolist()):
            r.output.append(t)  # the engine's own list: kept in both designs
        t0 = time.perf_counter()
        if not all(r.plain_greedy for r in rows):
            SamplingBatch.build(
                [r.params for r in rows],
                [r.prompt for r in rows],
                [r.output for r in rows],
                [r.generator for r in rows],
                args.vocab,
                device,
                [EOS] * num_rows,
            )
        _sync(device)
        t1 = time.perf_counter()
        batch.append_tokens(slots, tokens)
        if not batch.all_plain_greedy(slots):
            batch.gather(slots)
        _sync(device)
        t2 = time.perf_counter()
        old[step], new[step] = t1 - t0, t2 - t1
    old, new = old[args.warmup :] * 1e6, new[args.warmup :] * 1e6
    counts = batch.penalties.counts
    dense = 0 if counts is None else counts.shape[0] * args.vocab * 5  # int32 counts + bool mask
    return {
        "workload": kind,
        "rows": num_rows,
        "build_median_us": float(np.median(old)),
        "build_p99_us": float(np.percentile(old, 99)),
        "gather_median_us": float(np.median(new)),
        "gather_p99_us": float(np.percentile(new, 99)),
        "dense_penalty_bytes": dense,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=152064, help="V (Qwen2.5's by default)")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64, help="output tokens before step 1")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads; 1 keeps the [S, V] ops steady on a shared CPU",
    )
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = [
        _run(kind, n, args) for kind in ("mixed", "no-penalty", "greedy") for n in args.batch_sizes
    ]
    print(
        f"\nsampling_batch  commit={commit()}  cpu={platform.processor() or platform.machine()}"
        f"  device={args.device}  threads={args.threads}  V={args.vocab}  prompt={args.prompt_len}"
        f"  steps={args.steps}"
    )
    print(
        f"{'workload':<12} {'rows':>5} {'build med':>10} {'p99':>9} {'gather med':>11} {'p99':>9}"
        f" {'speed-up':>9} {'dense MB':>9}"
    )
    for r in results:
        speedup = r["build_median_us"] / max(r["gather_median_us"], 1e-9)
        print(
            f"{r['workload']:<12} {r['rows']:>5} {r['build_median_us']:>10.1f}"
            f" {r['build_p99_us']:>9.1f} {r['gather_median_us']:>11.1f}"
            f" {r['gather_p99_us']:>9.1f} {speedup:>8.1f}x {r['dense_penalty_bytes'] / 1e6:>9.1f}"
        )
    if args.json:
        payload = {"commit": commit(), "machine": platform.node(), "args": vars(args)}
        with open(args.json, "w") as f:
            json.dump({**payload, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
