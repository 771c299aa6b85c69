"""Batch-1 latency: time to first token (TTFT) and time per output token (TPOT), Kestrel vs
Hugging Face transformers (`--compare-hf`) on the same model shape in the same run.

    python benchmarks/latency.py --model qwen2.5-7b --compare-hf --json lat.json --png lat.png

`--model` is a preset shape with random weights (qwen2.5-7b, qwen2.5-0.5b) or a model directory.
`--unverified-kernels` turns on the kernels still off by default (kestrel.ops._dispatch.
UNVERIFIED_OPS, e.g. the dense decode GEMV dense_gemv_bf16 / dense_gemv_fp8), as
KESTREL_UNVERIFIED_KERNELS=1 does; run once with and once without to compare.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

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


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def kestrel_latency(model_dir: str, dummy: bool, args) -> dict:
    from kestrel import LLM, SamplingParams

    llm = LLM(
        model_dir,
        **engine_kwargs(
            args,
            dummy,
            max_model_len=args.input_len + args.output_len + 16,
            max_num_seqs=args.batch_size,
        ),
    )
    engine = llm.engine
    prompt = torch.randint(
        100, 20000, (args.input_len,), generator=torch.Generator().manual_seed(0)
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    ttfts, tpots = [], []
    for it in range(args.warmup + args.iters):
        for b in range(args.batch_size):
            engine.add_request(f"lat-{it}-{b}", prompt.tolist(), params)
        _sync()
        t0 = time.perf_counter()
        first = None
        while engine.has_unfinished_requests():
            outs = engine.step()
            if first is None and any(o.outputs[0].token_ids for o in outs):
                first = time.perf_counter()
        end = time.perf_counter()
        if it >= args.warmup:
            ttfts.append(first - t0)
            tpots.append((end - first) / (args.output_len - 1))
    return {"ttft_ms": 1e3 * statistics.median(ttfts), "tpot_ms": 1e3 * statistics.median(tpots)}


def hf_latency(model_dir: str, dummy: bool, args) -> dict:
    model = hf_model(model_dir, dummy, args.dtype)
    device = model.device
    ids = torch.randint(
        100, 20000, (args.batch_size, args.input_len), generator=torch.Generator().manual_seed(0)
    ).to(device)
    mask = torch.ones_like(ids)

    def run(n: int) -> float:
        _sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        _sync()
        return time.perf_counter() - t0

    run(4)  # warm-up
    ttft = statistics.median(run(1) for _ in range(args.iters))
    total = statistics.median(run(args.output_len) for _ in range(args.iters))
    return {"ttft_ms": 1e3 * ttft, "tpot_ms": 1e3 * (total - ttft) / (args.output_len - 1)}


def main() -> None:
    ap = engine_arg_parser(__doc__.split("\n")[0], skip=("max_num_seqs",))
    ap.add_argument("--batch-size", type=int, default=1, help="also the engine's max_num_seqs")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--unverified-kernels",
        action="store_true",
        help="run the kernels not yet on by default (KESTREL_UNVERIFIED_KERNELS=1)",
    )
    args = ap.parse_args()
    if args.unverified_kernels:
        os.environ["KESTREL_UNVERIFIED_KERNELS"] = "1"  # engine processes inherit it
        from kestrel.ops import _dispatch

        _dispatch.refresh_settings()  # this process read the environment at import

    model_dir, dummy = model_dir_for(args.model)
    results = run_both(
        lambda run_args: kestrel_latency(model_dir, dummy, run_args),
        (lambda: hf_latency(model_dir, dummy, args)) if args.compare_hf else None,
        args,
    )
    rows = [[name, r["ttft_ms"], r["tpot_ms"]] for name, r in results.items()]
    print_table(
        f"latency  model={args.model} batch={args.batch_size} in={args.input_len} "
        f"out={args.output_len} device={device_name()} commit={commit()}"
        f"{' unverified-kernels' if args.unverified_kernels else ''}",
        ["engine", "TTFT ms", "TPOT ms"],
        rows,
    )
    report(
        "latency",
        args,
        results,
        "tpot_ms",
        "ms / token",
        f"{args.model}: time per output token (batch {args.batch_size})",
    )


if __name__ == "__main__":
    main()
