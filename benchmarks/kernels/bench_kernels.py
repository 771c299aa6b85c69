"""Kernel benchmarks (issue 6): measure the device ceilings (copy bandwidth, bf16 GEMM) in the
same run, then time each Kestrel kernel and its torch baseline and report GB/s or TFLOP/s and
the share of the ceiling. Kernels are timed as CUDA-graph replays (no Python launch gaps) over
rotating inputs when one call's data would fit in L2.

    python benchmarks/kernels/bench_kernels.py --out kernels.json
    python benchmarks/kernels/bench_kernels.py --only decode,prefill --kv-cache-dtype fp8

Baselines: eager torch (the kestrel.ops references) for norm / rotary / activation, the
gathered-KV reference for decode attention, torch SDPA (flash backend) on contiguous equivalents
for prefill attention, the bf16 matmul on dequantized weights for the GGUF kernels
(bench_gguf.py), cuBLAS bf16 and quantize + `_scaled_mm` for the dense skinny GEMM
(bench_gemv.py, `--only gemv`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from bench_gemv import bench_gemv
from bench_gguf import bench_gguf
from timing import copy_bandwidth, gemm_flops, time_events, time_graph

from kestrel import ops
from kestrel.ops import AttentionMetadata

DT = torch.bfloat16
ROTATE_BYTES = 256 << 20  # rotate inputs until one pass over them exceeds the 50 MB L2 well
RESULTS: list[dict] = []
KV_DT: list[torch.dtype] = [DT]  # the attention benchmarks' cache dtype (--kv-cache-dtype)


def _row(kernel, case, seconds, amount, unit, ceiling, baseline_s=None, note=""):
    rate = amount / seconds
    RESULTS.append(
        {
            "kernel": kernel,
            "case": case,
            "time_us": seconds * 1e6,
            "rate": rate / 1e12 if unit == "TFLOP/s" else rate / 1e9,
            "unit": unit,
            "pct_of_ceiling": 100 * rate / ceiling,
            "baseline_us": None if baseline_s is None else baseline_s * 1e6,
            "speedup": None if baseline_s is None else baseline_s / seconds,
            "note": note,
        }
    )


def _copies(make: Callable[[], tuple], bytes_per_call: int) -> list[tuple]:
    return [make() for _ in range(max(1, math.ceil(ROTATE_BYTES / bytes_per_call)))]


def bench_elementwise(bw: float) -> None:
    tokens, hidden, inter = 16384, 4096, 14336
    weight = torch.randn(hidden, device="cuda", dtype=DT)
    xs = _copies(
        lambda: (torch.randn(tokens, hidden, device="cuda", dtype=DT),), 4 * tokens * hidden
    )
    t = time_graph([lambda x=x: ops.rms_norm(x[0], weight, 1e-6) for x in xs], 8)
    base = time_events(lambda: ops.rms_norm_reference(xs[0][0], weight, 1e-6))
    _row("rms_norm", f"T={tokens} H={hidden}", t, 4 * tokens * hidden, "GB/s", bw, base)

    pairs = _copies(
        lambda: tuple(torch.randn(tokens, hidden, device="cuda", dtype=DT) for _ in range(2)),
        8 * tokens * hidden,
    )
    t = time_graph([lambda p=p: ops.fused_add_rms_norm(p[0], p[1], weight, 1e-6) for p in pairs], 8)
    base = time_events(lambda: ops.fused_add_rms_norm_reference(*pairs[0], weight, 1e-6))
    _row("fused_add_rms_norm", f"T={tokens} H={hidden}", t, 8 * tokens * hidden, "GB/s", bw, base)

    t_act = 8192
    gates = _copies(
        lambda: (torch.randn(t_act, 2 * inter, device="cuda", dtype=DT),), 6 * t_act * inter
    )
    t = time_graph([lambda g=g: ops.silu_and_mul(g[0]) for g in gates], 8)
    base = time_events(lambda: ops.silu_and_mul_reference(gates[0][0]))
    _row("silu_and_mul", f"T={t_act} I={inter}", t, 6 * t_act * inter, "GB/s", bw, base)

    hq, hkv, d, bs = 32, 8, 128, 16
    cos_sin = ops.compute_cos_sin_cache(d, 131072, 500000.0, None, device="cuda")
    kv_cache = [torch.empty(tokens // bs, bs, hkv, d, device="cuda", dtype=DT) for _ in range(2)]
    rope_bytes = 2 * tokens * d * (2 * hq + 3 * hkv + 2 * hkv) + tokens * d * 4

    def make_rope():
        qkv = torch.randn(tokens, (hq + 2 * hkv) * d, device="cuda", dtype=DT)
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        pos = torch.randint(0, 131072, (tokens,), device="cuda")
        slots = torch.randperm(tokens, device="cuda")
        return pos, q.view(tokens, hq, d), k.view(tokens, hkv, d), v.view(tokens, hkv, d), slots

    ropes = _copies(make_rope, rope_bytes)

    def rope(r, fn=ops.rotary_embedding_and_cache):
        pos, q, k, v, slots = r
        fn(pos, q, k, v, cos_sin, kv_cache[0], kv_cache[1], slots)

    t = time_graph([lambda r=r: rope(r) for r in ropes], 8)
    base = time_events(lambda: rope(ropes[0], ops.rotary_embedding_and_cache_reference))
    _row("rotary+kv_write", f"T={tokens} Hq={hq} Hkv={hkv} D={d}", t, rope_bytes, "GB/s", bw, base)


def _paged(num_seqs, ctx, query_len, hkv, d, bs, sets):
    """A cache holding `sets` disjoint batches of num_seqs contexts of ctx tokens, blocks
    shuffled; returns (key_cache, value_cache, [metadata per set])."""
    per_seq = -(-ctx // bs)
    num_blocks = sets * num_seqs * per_seq
    kc = torch.randn(num_blocks, bs, hkv, d, device="cuda", dtype=DT).to(KV_DT[0])
    vc = torch.randn(num_blocks, bs, hkv, d, device="cuda", dtype=DT).to(KV_DT[0])
    perm = torch.randperm(num_blocks, device="cuda").int().view(sets, num_seqs, per_seq)
    qsl = torch.arange(num_seqs + 1, dtype=torch.int32) * query_len
    lens = torch.full((num_seqs,), ctx, dtype=torch.int32)
    metas = [
        AttentionMetadata(
            slot_mapping=torch.zeros(num_seqs * query_len, dtype=torch.int64, device="cuda"),
            query_start_loc=qsl.cuda(),
            seq_lens=lens.cuda(),
            block_tables=perm[s].contiguous(),
            num_decodes=num_seqs if query_len == 1 else 0,
            num_decode_tokens=num_seqs if query_len == 1 else 0,
            max_query_len=query_len,
            max_seq_len=ctx,
            query_start_loc_cpu=qsl,
            seq_lens_cpu=lens,
        )
        for s in range(sets)
    ]
    return kc, vc, metas


def _decode_case(bw: float, batch: int, ctx: int, hq: int, hkv: int, tc_min: int = 4) -> None:
    ops.attention_cuda.TC_MIN_GROUP = tc_min
    d, bs = 128, 16
    kv_bytes = batch * ctx * hkv * d * 2 * KV_DT[0].itemsize
    sets = max(1, math.ceil(ROTATE_BYTES / kv_bytes))
    kc, vc, metas = _paged(batch, ctx, 1, hkv, d, bs, sets)
    qs = [torch.randn(batch, hq, d, device="cuda", dtype=DT) for _ in metas]
    scale = d**-0.5
    fns = [lambda q=q, m=m: ops.paged_attention(q, kc, vc, m, scale) for q, m in zip(qs, metas)]
    t = time_graph(fns, max(8, sets))
    out = torch.empty_like(qs[0])
    base = time_events(
        lambda: ops.paged_decode_attention(qs[0], kc, vc, metas[0], scale, out), iters=5
    )
    splits = ops.attention_cuda.decode_plan(qs[0], hkv, batch, ctx)
    total = kv_bytes + 2 * batch * hq * d * 2
    case = f"B={batch} ctx={ctx} Hq={hq} Hkv={hkv} D={d}" + _kv_label()
    note = f"splits={splits} heads/block={ops.attention_cuda.heads_per_block(hq // hkv, d)}"
    _row("decode_attention", case, t, total, "GB/s", bw, base, note)


def _prefill_case(peak: float, variant: str, n: int, hq: int, hkv: int, d: int) -> None:
    os.environ[ops.attention_cuda.PREFILL_KERNEL_ENV] = variant
    ops._dispatch.refresh_settings()  # the settings are read once; backends built now see it
    kc, vc, metas = _paged(1, n, n, hkv, d, 16, 1)
    q = torch.randn(n, hq, d, device="cuda", dtype=DT)
    scale = d**-0.5
    t = time_graph([lambda: ops.paged_attention(q, kc, vc, metas[0], scale)], 5)
    # Contiguous equivalent for SDPA: [1, H, N, D], K/V expanded to the query heads.
    table = metas[0].block_tables[0].long()
    group = hq // hkv
    k = kc[table].flatten(0, 1)[:n].transpose(0, 1).repeat_interleave(group, 0)[None].to(DT)
    v = vc[table].flatten(0, 1)[:n].transpose(0, 1).repeat_interleave(group, 0)[None].to(DT)
    k, v = k.contiguous(), v.contiguous()
    qd = q.transpose(0, 1)[None].contiguous()  # [1, Hq, N, D]

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(qd, k, v, is_causal=True, scale=scale)

    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        base = time_graph([sdpa], 5)
        ref = sdpa()[0].transpose(0, 1)  # [N, Hq, D]
    got = ops.paged_attention(q, kc, vc, metas[0], scale)
    err = float((got.float() - ref.float()).norm() / ref.float().norm())
    flops = 4 * d * hq * n * (n + 1) / 2
    note = f"relerr_vs_sdpa={err:.1e} sdpa={flops / base / 1e12:.0f}TFLOP/s"
    case = f"N={n} Hq={hq} Hkv={hkv} D={d} causal {variant}" + _kv_label()
    _row("prefill_attention", case, t, flops, "TFLOP/s", peak, base, note)


def _kv_label() -> str:
    return "" if KV_DT[0] == DT else " kv=fp8"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="kernels.json")
    parser.add_argument("--only", default="elementwise,decode,prefill,gguf,gemv")
    parser.add_argument(
        "--prefill-kernels", default="auto,mma", help="KESTREL_PREFILL_KERNEL values to time"
    )
    parser.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=("auto", "fp8"),
        help="the decode / prefill attention caches: bf16 (auto) or float8 e4m3 (scales 1)",
    )
    args = parser.parse_args()
    if args.kv_cache_dtype == "fp8":
        KV_DT[0] = torch.float8_e4m3fn
        os.environ[ops._dispatch.UNVERIFIED_ENV] = "1"  # the FP8 KV kernels, until verified
        ops._dispatch.refresh_settings()
    assert ops.kernels_available(), "kestrel._kernels is not built"
    torch.manual_seed(0)
    bw, peak = copy_bandwidth(), gemm_flops()
    parts = args.only.split(",")
    if "elementwise" in parts:
        bench_elementwise(bw)
    if "decode" in parts:
        cases = [(1, 2048, 32, 8), (16, 2048, 32, 8), (16, 8192, 32, 8), (64, 2048, 32, 8)]
        cases += [(64, 8192, 32, 8), (16, 16384, 32, 8), (16, 4096, 28, 4), (64, 4096, 28, 4)]
        cases += [(16, 2048, 14, 2), (64, 8192, 14, 2)]
        # The CUDA-core kernel on the same shapes (tensor cores off), for comparison.
        cases += [(16, 2048, 32, 8, 99), (64, 2048, 32, 8, 99), (16, 4096, 28, 4, 99)]
        cases += [(64, 4096, 28, 4, 99)]
        for case in cases:
            _decode_case(bw, *case)
    if "prefill" in parts:
        cases = [(4096, 32, 8, 128), (4096, 32, 32, 128), (4096, 32, 32, 64), (16384, 32, 8, 128)]
        for variant in args.prefill_kernels.split(","):
            for case in cases:
                _prefill_case(peak, variant, *case)
    if "gguf" in parts:
        bench_gguf(_row, bw)
    if "gemv" in parts:
        bench_gemv(_row, bw)
    device = torch.cuda.get_device_name()
    report = {
        "device": device,
        "commit": os.environ.get("KESTREL_COMMIT", "unknown"),
        "torch": torch.__version__,
        "copy_GBps": bw / 1e9,
        "gemm_bf16_TFLOPs": peak / 1e12,
        "results": RESULTS,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(
        f"device {device}  commit {report['commit']}  copy {bw / 1e9:.0f} GB/s  "
        f"bf16 GEMM {peak / 1e12:.0f} TFLOP/s"
    )
    print(
        f"{'kernel':<20} {'case':<42} {'us':>9} {'rate':>8} {'unit':<8} {'%ceil':>6} "
        f"{'torch us':>9} {'x':>6}  note"
    )
    for r in RESULTS:
        base = "" if r["baseline_us"] is None else f"{r['baseline_us']:9.1f} {r['speedup']:6.2f}"
        print(
            f"{r['kernel']:<20} {r['case']:<42} {r['time_us']:9.1f} {r['rate']:8.1f} "
            f"{r['unit']:<8} {r['pct_of_ceiling']:6.1f} {base}  {r['note']}"
        )


if __name__ == "__main__":
    main()
