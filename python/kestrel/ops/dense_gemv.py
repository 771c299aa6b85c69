"""Skinny GEMM for decode over a dense weight: out = (x @ W^T) * scale + bias for M = 1..8 rows.

x [M, K] and out [M, N] are fp16 or bf16; W [N, K] is in x's dtype or float8_e4m3fn (W8A16:
the fp8 weight is widened exactly, the activations are not quantized); scale (float32 [N], the
per-output-channel weight scale) and bias ([N], x's dtype) are optional. The CUDA kernel
(cuda/dense_gemv.cuh) runs the multiply-adds on tensor cores with fp32 accumulation;
`dense_gemv_reference` is its float32 oracle and runs anywhere.

Kernel limits (`gemv_shape_ok`, `gemv_input_ok`): 1 <= M <= 8, K a multiple of 8 (16 for fp8
weights), W rows contiguous and 16-byte aligned, x rows 16-byte aligned with unit column stride.
Callers check them and keep their cuBLAS / `_scaled_mm` path otherwise; `dense_gemv` raises
ValueError naming the value for anything outside them.

The two uses are gated separately: "dense_gemv_fp8" (the FP8 linear method, layers/fp8.py) is on
(measured faster on the H200); "dense_gemv_bf16" (the unquantized linear method with fp16/bf16
weights, layers/dense_gemv_linear.py) stays in _dispatch.UNVERIFIED_OPS (no engine gain yet).
"""

from __future__ import annotations

import torch

from kestrel.ops import _dispatch

MAX_ROWS = 8  # activation rows of the kernel (the decode CUDA graphs of batch 1..8)
FP8_DTYPE = torch.float8_e4m3fn
OP_FP8 = "dense_gemv_fp8"
OP_BF16 = "dense_gemv_bf16"  # 16-bit weights, fp16 or bf16
_WEIGHT_FP8_CODE = 2  # kestrel._kernels.DTYPE_FLOAT8_E4M3
WARPS = (0, 8, 16)  # warps per block: 0 = the kernel's choice by N (dense_gemv.cuh)


def k_multiple(weight_dtype: torch.dtype) -> int:
    """K must be a multiple of this (one 16-byte weight chunk per lane holds 8 or 16 values)."""
    return 16 if weight_dtype == FP8_DTYPE else 8


def gemv_enabled(device: torch.device | str | None, dtype: torch.dtype, fp8: bool) -> bool:
    """A layer's choice at construction: the kernels run for this device and activation dtype
    and the op is verified (or allowed unverified). False on the CPU."""
    op = OP_FP8 if fp8 else OP_BF16
    return _dispatch.kernels_for(device, dtype) and _dispatch.kernel_verified(op)


def gemv_shape_ok(weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """The weight [N, K] can feed the kernel with activations of `dtype` (checked once)."""
    if weight.dim() != 2 or _dispatch.dtype_code(dtype) is None:
        return False
    if weight.dtype not in (dtype, FP8_DTYPE):
        return False
    n, k = weight.shape
    return (
        n > 0
        and 0 < k <= 2**30
        and k % k_multiple(weight.dtype) == 0
        and weight.stride(1) == 1
        and (weight.stride(0) * weight.element_size()) % 16 == 0
        and weight.data_ptr() % 16 == 0
    )


def gemv_input_ok(x: torch.Tensor) -> bool:
    """x [M, K] is a kernel input: 1 <= M <= 8, unit column stride, 16-byte aligned rows."""
    return (
        x.dim() == 2
        and 1 <= x.shape[0] <= MAX_ROWS
        and x.stride(1) == 1
        and x.stride(0) % 8 == 0
        and x.data_ptr() % 16 == 0
    )


def dense_gemv_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The oracle: float32 math on the (dequantized) weight, rounded once to x's dtype.
    x [M, K], weight [N, K], scale [N] (or [1, N]) float32, bias [N] -> [M, N]."""
    w = weight.float()
    if scale is not None:
        w = w * scale.float().reshape(-1, 1)
    out = x.float() @ w.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def _check(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    out: torch.Tensor | None,
) -> None:
    """ValueError naming the first input outside the kernel's limits."""
    if _dispatch.dtype_code(x.dtype) is None or x.dim() != 2:
        raise ValueError(
            f"dense_gemv: x must be a float16/bfloat16 [M, K] matrix; got {x.dtype} of shape "
            f"{tuple(x.shape)}"
        )
    m, k = x.shape
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"dense_gemv: M (rows of x) must be in [1, {MAX_ROWS}]; got {m}")
    if weight.dim() != 2 or weight.shape[1] != k or weight.dtype not in (x.dtype, FP8_DTYPE):
        raise ValueError(
            f"dense_gemv: weight must be [N, {k}] of {x.dtype} or {FP8_DTYPE}; got "
            f"{weight.dtype} of shape {tuple(weight.shape)}"
        )
    multiple = k_multiple(weight.dtype)
    if k == 0 or k % multiple != 0 or k > 2**30:
        raise ValueError(
            f"dense_gemv: K must be a positive multiple of {multiple} (at most 2^30) for "
            f"{weight.dtype} weights; got K={k}"
        )
    if not gemv_shape_ok(weight, x.dtype):
        raise ValueError(
            f"dense_gemv: weight rows must be contiguous and 16-byte aligned; got strides "
            f"{weight.stride()}, data_ptr % 16 = {weight.data_ptr() % 16}"
        )
    if not gemv_input_ok(x):
        raise ValueError(
            f"dense_gemv: x rows must have unit column stride, a row stride multiple of 8 and "
            f"16-byte alignment; got strides {x.stride()}, data_ptr % 16 = {x.data_ptr() % 16}"
        )
    n = weight.shape[0]
    if scale is not None and (scale.dtype != torch.float32 or scale.numel() != n
                              or not scale.is_contiguous()):  # fmt: skip
        raise ValueError(
            f"dense_gemv: scale must be contiguous float32 with {n} values; got {scale.dtype} "
            f"of shape {tuple(scale.shape)}"
        )
    if bias is not None and (bias.dtype != x.dtype or bias.numel() != n
                             or not bias.is_contiguous()):  # fmt: skip
        raise ValueError(
            f"dense_gemv: bias must be contiguous {x.dtype} with {n} values; got {bias.dtype} "
            f"of shape {tuple(bias.shape)}"
        )
    if out is not None and (tuple(out.shape) != (m, n) or out.dtype != x.dtype
                            or out.stride(1) != 1 or (m > 1 and out.stride(0) < n)):  # fmt: skip
        raise ValueError(
            f"dense_gemv: out must be {x.dtype} [{m}, {n}] with unit column stride; got "
            f"{out.dtype} of shape {tuple(out.shape)}, strides {out.stride()}"
        )


def dense_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    warps: int = 0,
    fp8_widen: int = 0,
) -> torch.Tensor:
    """The CUDA kernel: x [M, K] (M = 1..8) -> out [M, N] = (x @ weight^T) * scale + bias in
    x's dtype. `out` may be a column slice of a wider [M, *] tensor. No host synchronization
    and no allocation besides `out` when it is not given: CUDA-graph capturable. `warps`: warps
    per 16-row block, 8 or 16, or 0 to let the kernel choose by N; `fp8_widen`: how e4m3 codes
    become x's dtype, 0 bit moves, 1 the cvt instructions (both for benchmarks)."""
    _check(x, weight, scale, bias, out)
    if warps not in WARPS:
        raise ValueError(f"dense_gemv: warps must be one of {WARPS}; got {warps}")
    if fp8_widen not in (0, 1):
        raise ValueError(f"dense_gemv: fp8_widen must be 0 or 1; got {fp8_widen}")
    tensors = {"x": x, "weight": weight}
    tensors.update({name: t for name, t in (("scale", scale), ("bias", bias), ("out", out))
                    if t is not None})  # fmt: skip
    _dispatch.require_same_device("dense_gemv", **tensors)
    if not x.is_cuda or _dispatch.kernels is None:
        raise ValueError(f"dense_gemv: needs the CUDA kernels and CUDA tensors; got {x.device}")
    m, n = x.shape[0], weight.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    code = _dispatch.dtype_code(x.dtype)
    weight_code = _WEIGHT_FP8_CODE if weight.dtype == FP8_DTYPE else code
    args = _dispatch.kernel_args(
        _dispatch.kernels.DenseGemvArgs, out=out.data_ptr(), ldo=out.stride(0),
        x=x.data_ptr(), ldx=x.stride(0), weight=weight.data_ptr(), ldw=weight.stride(0),
        scale=0 if scale is None else scale.data_ptr(),
        bias=0 if bias is None else bias.data_ptr(),
        m=m, n=n, k=x.shape[1], warps=warps, fp8_widen=fp8_widen, weight_dtype=weight_code,
        dtype=code,
    )  # fmt: skip
    with _dispatch.on_device(x.device):
        status = _dispatch.kernels.dense_gemv(args, _dispatch.stream_handle(x.device))
    _dispatch.check("dense_gemv", status)
    return out
