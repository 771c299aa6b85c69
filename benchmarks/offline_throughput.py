"""Offline throughput: N prompts of uniform random length, M new tokens each (EOS ignored),
output tokens/s, Kestrel vs transformers' continuous batching (`generate_batch`) in one run.

    python benchmarks/offline_throughput.py --model qwen2.5-0.5b --compare-hf --json t.json
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    commit,
    device_name,
    engine_arg_parser,
    engine_kwargs,
    hf_model,
    model_dir_for,
    print_table,
    report,
    run_both,
)


def make_prompts(n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(100, 20000, size=int(rng.integers(lo, hi + 1))).tolist() for _ in range(n)]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def kestrel_run(model_dir: str, dummy: bool, prompts: list[list[int]], args) -> dict:
    from kestrel import LLM, SamplingParams

    llm = LLM(
        model_dir,
        **engine_kwargs(args, dummy, max_model_len=args.max_input + args.output_len + 16),
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    _sync()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    _sync()
    elapsed = time.perf_counter() - t0
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "elapsed_s": elapsed,
        "output_tokens": out_tokens,
        "output_tok_s": out_tokens / elapsed,
        "total_tok_s": (out_tokens + sum(map(len, prompts))) / elapsed,
        "preemptions": llm.engine.stats()["num_preemptions"],
    }


def hf_run(model_dir: str, dummy: bool, prompts: list[list[int]], args) -> dict:
    from transformers import GenerationConfig

    model = hf_model(model_dir, dummy, args.dtype)
    gen = GenerationConfig(
        max_new_tokens=args.output_len, do_sample=False, eos_token_id=-1, pad_token_id=0
    )
    _sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        outs = model.generate_batch(inputs=prompts, generation_config=gen)
    _sync()
    elapsed = time.perf_counter() - t0
    out_tokens = sum(len(o.generated_tokens) for o in outs.values())
    return {
        "elapsed_s": elapsed,
        "output_tokens": out_tokens,
        "output_tok_s": out_tokens / elapsed,
        "total_tok_s": (out_tokens + sum(map(len, prompts))) / elapsed,
    }


def main() -> None:
    ap = engine_arg_parser(__doc__.split("\n")[0])
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--min-input", type=int, default=100)
    ap.add_argument("--max-input", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=512)
    args = ap.parse_args()

    model_dir, dummy = model_dir_for(args.model)
    prompts = make_prompts(args.num_prompts, args.min_input, args.max_input, args.seed)
    results = run_both(
        lambda run_args: kestrel_run(model_dir, dummy, prompts, run_args),
        (lambda: hf_run(model_dir, dummy, prompts, args)) if args.compare_hf else None,
        args,
    )
    rows = [
        [n, r["output_tokens"], r["elapsed_s"], r["output_tok_s"], r["total_tok_s"]]
        for n, r in results.items()
    ]
    print_table(
        f"offline throughput  model={args.model} prompts={args.num_prompts} "
        f"in=U[{args.min_input},{args.max_input}] out={args.output_len} "
        f"device={device_name()} commit={commit()}",
        ["engine", "out tokens", "seconds", "out tok/s", "total tok/s"],
        rows,
    )
    report(
        "offline_throughput",
        args,
        results,
        "output_tok_s",
        "output tokens / s",
        f"{args.model}: offline output tokens/s",
    )


if __name__ == "__main__":
    main()
