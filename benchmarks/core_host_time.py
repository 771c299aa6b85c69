"""Host time of one engine-core step with N running decodes, the model left out.

The engine core (`EngineCore` over `LLMEngine`, as `kestrel serve` runs it) steps N greedy
decodes of a tiny model whose executor returns its tokens at once (a null device): what is
timed is everything the core's host does per step besides the forward pass and sampling:
schedule(), slots and the step's arrays, update(), the input batch's history, the requests'
token bookkeeping, the per-request deltas and their msgpack encoding. With overlap scheduling
this is the budget the GPU step must exceed for the host to be hidden behind it.

    python benchmarks/core_host_time.py [--num-seqs 256] [--steps 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit

from kestrel.config import EngineConfig
from kestrel.engine import core_protocol as cp
from kestrel.engine.core_process import EngineCore
from kestrel.engine.llm_engine import LLMEngine
from kestrel.runner.step_future import StepFuture
from kestrel.sampling_params import SamplingParams
from kestrel.testing.tiny_models import make_tiny_model


class NullExecutor:
    """Keeps the runner's input batch (slots, history) but runs no model: every sampled row
    gets token 100 + its row, on the host."""

    def __init__(self, real) -> None:
        self.real = real

    def add_sequence(self, *args, **kwargs):
        return self.real.add_sequence(*args, **kwargs)

    def remove_sequence(self, key):
        return self.real.remove_sequence(key)

    def append_tokens(self, slots, tokens):
        self.real.append_tokens(slots, tokens)

    def launch(self, step, slots, prompt_rows=None, grammar_mask=None):
        tokens = torch.from_numpy(100 + np.arange(step.num_sampled, dtype=np.int64) % 300)
        return StepFuture(tokens)

    def execute(self, step, slots, prompt_rows=None, grammar_mask=None):
        return self.launch(step, slots).result()


def measure(num_seqs: int, steps: int, async_scheduling: bool, model_dir: str) -> dict:
    config = EngineConfig(
        model=model_dir,
        max_num_seqs=num_seqs,
        num_kv_blocks=num_seqs * 40,
        max_model_len=512,
        async_scheduling=async_scheduling,
        disable_log_stats=True,
    )
    engine = LLMEngine(config, token_texts=False)
    engine.executor = NullExecutor(engine.executor)
    core = EngineCore(engine, max_queued_requests=None)
    params = cp.params_to_wire(
        SamplingParams(
            temperature=0, max_tokens=min(steps + 50, 512 - 129), ignore_eos=True, detokenize=False
        )
    )
    prompt = list(range(3, 131))
    requests = [cp.AddRequest(f"r{i}", prompt, params, time.time(), 0) for i in range(num_seqs)]
    core.register(1)
    core.handle(cp.AddBatch(1, requests))
    for _ in range(20):  # prefill and warm-up: every request decoding
        core.step()
        core.pending_outputs()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        core.step()
        for out in core.pending_outputs().values():
            cp.output_encoder.encode(out)
        times.append(time.perf_counter() - t0)
    running = engine.stats()["num_running"]
    return {
        "num_seqs": num_seqs,
        "running": running,
        "async_scheduling": async_scheduling,
        "us_per_step_p50": 1e6 * statistics.median(times),
        "us_per_step_mean": 1e6 * statistics.mean(times),
        "us_per_token_p50": 1e6 * statistics.median(times) / max(1, running),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-seqs", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        make_tiny_model(tmp, "qwen2")
        rows = [measure(n, args.steps, a, tmp) for n in args.num_seqs for a in (False, True)]
    print(f"{'seqs':>5} {'overlap':>7} {'us/step p50':>12} {'mean':>8} {'us/token':>9}")
    for r in rows:
        print(
            f"{r['num_seqs']:>5} {r['async_scheduling']!s:>7} {r['us_per_step_p50']:>12.0f} "
            f"{r['us_per_step_mean']:>8.0f} {r['us_per_token_p50']:>9.2f}"
        )
    if args.json:
        payload = {"commit": commit(), "host": platform.node(), "rows": rows}
        Path(args.json).write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
