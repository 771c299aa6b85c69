"""GGUF quant kernel rows of bench_kernels.py (`--only gguf`): the fused dequantize-GEMV at
decode batch sizes and dequantize + cuBLAS at prefill sizes, on Qwen2.5-7B's projection shapes,
against the bf16 matmul on the same weights dequantized (what Kestrel ran before).

The GEMV rows come in pairs, `gguf_gemv v1` (fp32 FMAs, cuda/gguf_gemv.cuh) and `gguf_gemv v2`
(tensor cores, cuda/gguf_gemv_mma.cuh, the default), picked through KESTREL_GGUF_GEMV around
each capture. GB/s counts the bytes a call must move: the quantized weight, x and out (GEMV); the quantized
weight read plus the bf16 scratch written and read again (prefill). Weights are random valid
blocks (the timing does not depend on the values); calls rotate over copies when one copy would
fit in L2.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from timing import time_graph

from kestrel.layers.gguf_linear import GGUFSegment, gemv_segments
from kestrel.ops import gguf as gguf_ops

Q = GGMLQuantizationType
DT = torch.bfloat16
ROTATE_BYTES = 256 << 20
# Qwen2.5-7B: fused q/k/v, o_proj, fused gate/up, down_proj as (N, K).
SHAPES = {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)}
# Byte offsets of each type's fp16 scales inside a block (set to small finite values).
_SCALE_OFFSETS = {Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def random_gpu_blocks(qtype: GGMLQuantizationType, n: int, k: int) -> torch.Tensor:
    """uint8 [n, row_bytes] random blocks on the GPU with finite fp16 scales."""
    elems, nbytes = GGML_QUANT_SIZES[qtype]
    blocks = torch.randint(0, 256, (n * (k // elems), nbytes), dtype=torch.uint8, device="cuda")
    scale = torch.full((blocks.shape[0], 1), 1e-3, dtype=torch.float16, device="cuda")
    for offset in _SCALE_OFFSETS[qtype]:
        blocks[:, offset : offset + 2] = scale.view(torch.uint8)
    return blocks.reshape(n, -1)


def _copies(make: Callable[[], torch.Tensor], nbytes: int) -> list[torch.Tensor]:
    return [make() for _ in range(max(1, math.ceil(ROTATE_BYTES / nbytes)))]


def _gemv_case(row, bw: float, qtype: GGMLQuantizationType, name: str, m: int) -> None:
    n, k = SHAPES[name]
    wbytes = n * gguf_ops.row_bytes(qtype, k)
    weights = _copies(lambda: random_gpu_blocks(qtype, n, k), wbytes)
    x = torch.randn(m, k, device="cuda", dtype=DT)
    out = torch.empty(m, n, device="cuda", dtype=DT)
    fns = [lambda w=w: gguf_ops.gguf_gemv(x, w, qtype, out=out) for w in weights]
    times = {}
    saved = os.environ.get(gguf_ops.GEMV_VARIANT_ENV)
    try:
        for variant in gguf_ops.GEMV_VARIANTS:  # the launcher reads it when the graph is captured
            os.environ[gguf_ops.GEMV_VARIANT_ENV] = variant
            times[variant] = time_graph(fns, 8)
    finally:
        if saved is None:
            os.environ.pop(gguf_ops.GEMV_VARIANT_ENV, None)
        else:
            os.environ[gguf_ops.GEMV_VARIANT_ENV] = saved
    del weights, fns
    dense = _copies(lambda: torch.randn(n, k, device="cuda", dtype=DT), 2 * n * k)
    base = time_graph([lambda d=d: F.linear(x, d) for d in dense], 8)
    moved = wbytes + 2 * m * (k + n)
    note = f"{wbytes / 2**20:.0f} MiB weight; bf16 dense {2 * n * k / base / 1e9:.0f} GB/s"
    for variant, t in times.items():
        row(f"gguf_gemv {variant} {qtype.name}", f"{name} M={m} N={n} K={k}", t, moved, "GB/s", bw,
            base, note)  # fmt: skip


def _prefill_case(row, bw: float, qtype: GGMLQuantizationType, name: str, m: int) -> None:
    n, k = SHAPES[name]
    weight = random_gpu_blocks(qtype, n, k)
    x = torch.randn(m, k, device="cuda", dtype=DT)
    scratch = torch.empty(n, k, device="cuda", dtype=DT)

    def dequant_matmul() -> torch.Tensor:
        gguf_ops.gguf_dequantize(weight, qtype, DT, out=scratch)
        return F.linear(x, scratch)

    t = time_graph([dequant_matmul], 4)
    t_dq = time_graph([lambda: gguf_ops.gguf_dequantize(weight, qtype, DT, out=scratch)], 4)
    dense = torch.randn(n, k, device="cuda", dtype=DT)
    base = time_graph([lambda: F.linear(x, dense)], 4)
    moved = weight.numel() + 2 * n * k
    note = f"dequantize alone {t_dq * 1e6:.1f} us ({moved / t_dq / 1e9:.0f} GB/s)"
    row(f"gguf_prefill {qtype.name}", f"{name} M={m} N={n} K={k}", t, moved, "GB/s", bw, base,
        note)  # fmt: skip


def _crossover_case(row, bw: float, qtype: GGMLQuantizationType, m: int) -> None:
    """Batched decode rows (9..64): the GEMV in launches of 8 rows against dequantize + matmul
    (gguf_linear.GEMV_ROW_LIMIT picks between them)."""
    n, k = SHAPES["gate_up"]
    weight = random_gpu_blocks(qtype, n, k)
    segment = (GGUFSegment(qtype, 0, n, 0, weight.shape[1]),)
    flat = weight.reshape(-1)
    x = torch.randn(m, k, device="cuda", dtype=DT)
    scratch = torch.empty(n, k, device="cuda", dtype=DT)

    def dequant_matmul() -> torch.Tensor:
        gguf_ops.gguf_dequantize(weight, qtype, DT, out=scratch)
        return F.linear(x, scratch)

    t = time_graph([lambda: gemv_segments(x, flat, segment, n)], 4)
    base = time_graph([dequant_matmul], 4)
    row(f"gguf_gemv_chunked {qtype.name}", f"gate_up M={m}", t, weight.numel(), "GB/s", bw, base,
        "baseline: dequantize + matmul")  # fmt: skip


def bench_gguf(row, bw: float) -> None:
    """row: bench_kernels._row; bw: the measured copy bandwidth (bytes/s)."""
    for qtype in (Q.Q4_K, Q.Q6_K, Q.Q5_K, Q.Q8_0, Q.Q4_0):
        for name in SHAPES:
            for m in (1, 4, 8):
                _gemv_case(row, bw, qtype, name, m)
    for qtype in (Q.Q4_K, Q.Q6_K):
        for m in (16, 512):
            _prefill_case(row, bw, qtype, "gate_up", m)
        for m in (16, 32, 64):
            _crossover_case(row, bw, qtype, m)
