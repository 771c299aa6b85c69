"""Dense skinny-GEMM rows of bench_kernels.py (`--only gemv`): the dense_gemv kernel at decode
batch sizes M = 1, 2, 4, 8 on the projection shapes of Qwen2.5-7B and Qwen2.5-0.5B, bf16 and
FP8 (W8A16) weights, against what the layers ran before: cuBLAS (F.linear) on bf16 weights, and
the FP8 layer's activation quantization + `torch._scaled_mm` (`_scaled_mm` alone in the note).

GB/s counts the bytes a call must move: the weight (and its fp32 scales), x and out; % is of the
copy bandwidth measured in the same run. Calls rotate over weight copies until one pass exceeds
the L2, so every call reads its weight from HBM.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timing import time_graph

from kestrel.layers.fp8 import fp8_matmul, quantize_rows
from kestrel.ops import dense_gemv as gemv_ops

DT = torch.bfloat16
ROTATE_BYTES = 256 << 20
# (N, K) of the fused q/k/v, o_proj, fused gate/up and down_proj; the 7B LM head (1.09 GB in
# bf16, read every decode step; layers/embedding.py runs F.linear on it) for information.
SHAPES = {
    "7b": {
        "qkv": (4608, 3584),
        "o": (3584, 3584),
        "gate_up": (37888, 3584),
        "down": (3584, 18944),
        "lm_head": (152064, 3584),
    },
    "0.5b": {"qkv": (1152, 896), "o": (896, 896), "gate_up": (9728, 896), "down": (896, 4864)},
}
ROWS = (1, 2, 4, 8)


def _copies(make: Callable[[], tuple], nbytes: int) -> list[tuple]:
    return [make() for _ in range(max(1, math.ceil(ROTATE_BYTES / nbytes)))]


def _bf16_weight(n: int, k: int) -> tuple[torch.Tensor]:
    return (torch.randn(n, k, device="cuda", dtype=DT) * 0.05,)


def _fp8_weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    q, scale = quantize_rows(torch.randn(n, k, device="cuda", dtype=DT) * 0.05)
    return q, scale.reshape(1, n).contiguous()  # [N, K] e4m3, [1, N] fp32 (the layer's)


def _time(fns: list[Callable[[], object]]) -> float:
    return time_graph(fns, max(8, len(fns)))


def _gemv_times(call: Callable[[tuple, int], object], weights: list[tuple]) -> tuple[float, str]:
    """Seconds per call with the kernel's own choice of warps per block, and a note with the
    time of each forced choice (8, 16: which one kWideBelowRows should pick)."""
    t = _time([lambda w=w: call(w, 0) for w in weights])
    forced = {
        warps: _time([lambda w=w, warps=warps: call(w, warps) for w in weights])
        for warps in (8, 16)
    }
    return t, " ".join(f"{warps}w {s * 1e6:.1f} us" for warps, s in forced.items())


def _case(row, bw: float, model: str, name: str, m: int) -> None:
    n, k = SHAPES[model][name]
    case = f"{model} {name} M={m} N={n} K={k}"
    io = 2 * m * (k + n)  # x and out, bf16
    x = torch.randn(m, k, device="cuda", dtype=DT)
    out = torch.empty(m, n, device="cuda", dtype=DT)

    dense = _copies(lambda: _bf16_weight(n, k), 2 * n * k)
    t_cublas = _time([lambda w=w: F.linear(x, w[0]) for w in dense])
    t_gemv, by_warps = _gemv_times(
        lambda w, warps: gemv_ops.dense_gemv(x, w[0], out=out, warps=warps), dense
    )
    moved = 2 * n * k + io
    note = f"cuBLAS {moved / t_cublas / 1e9:.0f} GB/s ({100 * moved / t_cublas / bw:.0f}%); "
    row("dense_gemv bf16", case, t_gemv, moved, "GB/s", bw, t_cublas, note + by_warps)
    del dense

    fp8 = _copies(lambda: _fp8_weight(n, k), n * k)
    t_fp8, by_warps = _gemv_times(
        lambda w, warps: gemv_ops.dense_gemv(x, w[0], w[1].view(-1), out=out, warps=warps), fp8
    )
    t_cvt = _time([lambda w=w: gemv_ops.dense_gemv(x, w[0], w[1].view(-1), out=out, fp8_widen=1)
                   for w in fp8])  # fmt: skip
    by_warps += f" cvt-widen {t_cvt * 1e6:.1f} us"
    x_q, x_scale = quantize_rows(x)
    t_mm = _time([lambda w=w: fp8_matmul(x_q, x_scale, w[0], w[1], DT) for w in fp8])
    t_layer = _time([lambda w=w: fp8_matmul(*quantize_rows(x), w[0], w[1], DT) for w in fp8])
    moved = n * k + 4 * n + io
    note = (
        f"baseline: quantize+_scaled_mm; _scaled_mm alone {t_mm * 1e6:.1f} us "
        f"({moved / t_mm / 1e9:.0f} GB/s); vs cuBLAS bf16 {t_cublas / t_fp8:.2f}x; {by_warps}"
    )
    row("dense_gemv fp8", case, t_fp8, moved, "GB/s", bw, t_layer, note)


def bench_gemv(row, bw: float) -> None:
    """row: bench_kernels._row; bw: the measured copy bandwidth (bytes/s)."""
    for model, shapes in SHAPES.items():
        for name in shapes:
            for m in ROWS:
                _case(row, bw, model, name, m)
