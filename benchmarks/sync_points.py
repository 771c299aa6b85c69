"""Where the steady decode loop synchronizes the host with the GPU.

Runs the engine (Qwen2.5-0.5B shape, dummy weights, overlap scheduling on) over 8 requests of each
kind (greedy, sampled, sampled with logprobs) and counts the calls that torch reports as
synchronizing (`torch.cuda.set_sync_debug_mode("warn")`) over 20 steps, by their call sites in
kestrel. With overlap scheduling the only wait per step should be the StepFuture's event.

    python benchmarks/sync_points.py [--steps 20]
"""

from __future__ import annotations

import argparse
import collections
import sys
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import model_dir_for

from kestrel import LLM, SamplingParams

KINDS = {
    "greedy": SamplingParams(temperature=0, max_tokens=400, ignore_eos=True),
    "sampled": SamplingParams(temperature=0.8, top_p=0.9, max_tokens=400, ignore_eos=True),
    "logprobs": SamplingParams(temperature=0.8, max_tokens=400, ignore_eos=True, logprobs=2),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--no-async-scheduling", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("sync_points.py needs a CUDA GPU")
    path, _ = model_dir_for("qwen2.5-0.5b")
    llm = LLM(
        path,
        load_format="dummy",
        max_num_seqs=64,
        max_model_len=2048,
        async_scheduling=not args.no_async_scheduling,
    )
    engine = llm.engine
    for kind, params in KINDS.items():
        for i in range(8):
            engine.add_request(f"{kind}{i}", list(range(100, 228)), params)
        for _ in range(10):  # prefill and warm-up
            engine.step()
        sites: collections.Counter[str] = collections.Counter()

        def record(message, category, filename, lineno, file=None, line=None, sites=sites):
            frames = [f for f in traceback.extract_stack()[:-1] if "kestrel" in f.filename]
            key = "; ".join(f"{f.filename.split('kestrel/')[-1]}:{f.lineno}" for f in frames[-3:])
            sites[key] += 1

        def scan(label: str, arrivals: bool, kind=kind, params=params, sites=sites) -> None:
            """args.steps steps; with `arrivals`, a new request (a fresh prompt) joins before
            each, so every step also runs a prefill (the mixed steps of a server under load)."""
            sites.clear()
            shown = warnings.showwarning
            warnings.showwarning = record
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                for s in range(args.steps):
                    if arrivals:
                        prompt = [100 + (7 * s + j) % 20000 for j in range(128)]
                        engine.add_request(f"{kind}-new{s}", prompt, params)
                    engine.step()
                torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = shown
            print(f"== {label}: {sum(sites.values())} synchronizing calls in {args.steps} steps")
            for site, n in sites.most_common(8):
                print(f"  {n:4d}  {site}")

        scan(kind, arrivals=False)
        scan(f"{kind}, a new request every step", arrivals=True)
        for i in range(8):
            engine.abort_request(f"{kind}{i}")
        for s in range(args.steps):
            engine.abort_request(f"{kind}-new{s}")


if __name__ == "__main__":
    main()
