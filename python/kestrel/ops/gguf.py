"""GGUF block-quantized weights kept as raw blocks: torch dequantizers and the CUDA kernels.

A weight W [N, K] of GGML type Q8_0, Q4_0, Q4_K, Q5_K or Q6_K is held as its GGUF bytes,
uint8 [N, row_bytes] with row_bytes = K / block_elems * block_bytes (blocks run along K, so
rows can be sliced and concatenated freely). The block layouts are llama.cpp's (see the `gguf`
package's quants.py); `dequantize_reference` decodes them with vectorized torch ops on any
device and is the oracle of the kernels:

- `gguf_gemv` (CUDA): out [M, N] = x [M, K] @ W^T for M = 1..8, dequantizing in registers;
  KESTREL_GGUF_GEMV picks the kernel, read at every call: `v2` (default; tensor cores,
  cuda/gguf_gemv_mma.cuh) or `v1` (fp32 FMAs, cuda/gguf_gemv.cuh), so one GPU run can measure
  both.
- `gguf_dequantize` (CUDA): W -> [N, K] in fp16/bf16, for a cuBLAS matmul when M > 8.
"""

from __future__ import annotations

import os

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from kestrel.ops import _dispatch
from kestrel.ops.ggml_dequant import dequantize_raw

Q = GGMLQuantizationType

# The formats with kernels (what Q4_K_M, Q5_K_M, Q6_K and Q8_0 files hold for their linears).
KERNEL_TYPES: frozenset[GGMLQuantizationType] = frozenset({Q.Q8_0, Q.Q4_0, Q.Q4_K, Q.Q5_K, Q.Q6_K})
MAX_GEMV_ROWS = 8  # activation rows of the fused GEMV; more rows dequantize + matmul
GEMV_VARIANT_ENV = "KESTREL_GGUF_GEMV"  # "v2" (default, also when unset or empty) or "v1"
GEMV_VARIANTS = ("v1", "v2")


def block_size(qtype: GGMLQuantizationType) -> tuple[int, int]:
    """(elements, bytes) of one block of a kernel type; ValueError for any other type."""
    if qtype not in KERNEL_TYPES:
        names = ", ".join(sorted(t.name for t in KERNEL_TYPES))
        name = getattr(qtype, "name", repr(qtype))
        raise ValueError(f"GGML type {name} has no GGUF kernel; supported: {names}")
    return GGML_QUANT_SIZES[qtype]


def row_bytes(qtype: GGMLQuantizationType, k: int) -> int:
    """Bytes of one row of K elements; K must be a positive multiple of the block size."""
    elems, nbytes = block_size(qtype)
    if k <= 0 or k % elems != 0:
        raise ValueError(
            f"{qtype.name} rows need K a positive multiple of {elems} elements; got K={k}"
        )
    return k // elems * nbytes


# ---- torch reference (the dequantizers of ops/ggml_dequant.py, then an fp32 matmul) ----------


def _check_blocks(op: str, blocks: torch.Tensor, qtype: GGMLQuantizationType) -> int:
    """Validate uint8 [N, row_bytes] raw blocks; returns K."""
    elems, nbytes = block_size(qtype)
    if blocks.dtype != torch.uint8 or blocks.dim() != 2:
        raise ValueError(
            f"{op}: weight must be uint8 [N, row_bytes] raw {qtype.name} blocks; got "
            f"{blocks.dtype} of shape {tuple(blocks.shape)}"
        )
    if blocks.shape[1] == 0 or blocks.shape[1] % nbytes != 0:
        raise ValueError(
            f"{op}: a {qtype.name} row must be a positive whole number of {nbytes}-byte "
            f"blocks; got rows of {blocks.shape[1]} bytes"
        )
    return blocks.shape[1] // nbytes * elems


def dequantize_reference(
    blocks: torch.Tensor, qtype: GGMLQuantizationType, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Raw blocks uint8 [N, row_bytes] (any device) -> W [N, K] in `dtype` (computed in fp32,
    rounded once)."""
    _check_blocks("dequantize_reference", blocks, qtype)  # a kernel type, whole blocks
    return dequantize_raw(blocks, qtype, dtype)  # the loader's dequantizers (ops/ggml_dequant)


def gguf_matmul_reference(
    x: torch.Tensor, blocks: torch.Tensor, qtype: GGMLQuantizationType
) -> torch.Tensor:
    """x [M, K] @ dequantize(W)^T -> [M, N] in x's dtype (the matmul in x's dtype on CUDA,
    fp32 elsewhere: CPU half matmuls are slow and lossy)."""
    compute = x.dtype if x.is_cuda else torch.float32
    w = dequantize_reference(blocks, qtype, compute)
    return torch.nn.functional.linear(x.to(compute), w).to(x.dtype)


# ---- CUDA kernels ---------------------------------------------------------------------------


def gguf_kernels_usable() -> bool:
    """The GGUF kernels are built, not disabled, and verified on a GPU (or allowed unverified:
    _dispatch.UNVERIFIED_OPS); a layer that keeps GGUF blocks runs them only then."""
    ops = ("gguf_gemv", "gguf_dequantize")
    return _dispatch.kernels_available() and all(_dispatch.kernel_verified(op) for op in ops)


def _check_kernel_inputs(op: str, blocks: torch.Tensor, qtype: GGMLQuantizationType) -> int:
    k = _check_blocks(op, blocks, qtype)
    if not blocks.is_cuda or _dispatch.kernels is None:
        raise ValueError(f"{op}: needs the CUDA kernels and a CUDA weight; got {blocks.device}")
    if blocks.stride(1) != 1 or blocks.stride(0) != blocks.shape[1] or blocks.data_ptr() % 16:
        raise ValueError(f"{op}: the weight must be contiguous and 16-byte aligned")
    return k


def gguf_gemv(
    x: torch.Tensor,
    blocks: torch.Tensor,
    qtype: GGMLQuantizationType,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fused dequantize-GEMV kernel: x [M, K] (M = 1..8, fp16/bf16, contiguous rows) ->
    out [M, N] in x's dtype. `out` may be a column slice of a wider [M, *] tensor (its row
    stride is passed to the kernel)."""
    k = _check_kernel_inputs("gguf_gemv", blocks, qtype)
    variant = os.environ.get(GEMV_VARIANT_ENV, "")
    if variant and variant not in GEMV_VARIANTS:  # the launcher would refuse it too
        raise ValueError(
            f"gguf_gemv: {GEMV_VARIANT_ENV}={variant!r} is not one of {', '.join(GEMV_VARIANTS)}"
        )
    n = blocks.shape[0]
    code = _dispatch.dtype_code(x.dtype)
    if code is None or x.dim() != 2 or x.shape[1] != k or not 1 <= x.shape[0] <= MAX_GEMV_ROWS:
        raise ValueError(
            f"gguf_gemv: x must be fp16/bf16 [M, {k}] with 1 <= M <= {MAX_GEMV_ROWS}; got "
            f"{x.dtype} of shape {tuple(x.shape)}"
        )
    _dispatch.require_same_device("gguf_gemv", x=x, weight=blocks)
    if x.stride(1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16:
        x = x.contiguous()
    m = x.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if tuple(out.shape) != (m, n) or out.dtype != x.dtype or out.stride(1) != 1:
        raise ValueError(
            f"gguf_gemv: out must be {x.dtype} [{m}, {n}] with unit column stride; got "
            f"{out.dtype} of shape {tuple(out.shape)}, strides {out.stride()}"
        )
    assert _dispatch.kernels is not None
    args = _dispatch.kernel_args(
        _dispatch.kernels.GgufGemvArgs, out=out.data_ptr(), ldo=out.stride(0),
        x=x.data_ptr(), ldx=x.stride(0), weight=blocks.data_ptr(), row_bytes=blocks.shape[1],
        m=m, n=n, k=k, ggml_type=int(qtype), dtype=code,
    )  # fmt: skip
    with _dispatch.on_device(x.device):
        status = _dispatch.kernels.gguf_gemv(args, _dispatch.stream_handle(x.device))
    _dispatch.check("gguf_gemv", status)
    return out


def gguf_dequantize(
    blocks: torch.Tensor,
    qtype: GGMLQuantizationType,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The dequantize kernel: W -> [N, K] in dtype (fp16/bf16). `out` may be a row slice of a
    larger contiguous [*, K] buffer."""
    k = _check_kernel_inputs("gguf_dequantize", blocks, qtype)
    code = _dispatch.dtype_code(dtype)
    if code is None:
        raise ValueError(f"gguf_dequantize: dtype must be float16 or bfloat16; got {dtype}")
    n = blocks.shape[0]
    if out is None:
        out = torch.empty((n, k), dtype=dtype, device=blocks.device)
    if tuple(out.shape) != (n, k) or out.dtype != dtype or out.stride(1) != 1:
        raise ValueError(
            f"gguf_dequantize: out must be {dtype} [{n}, {k}] with unit column stride; got "
            f"{out.dtype} of shape {tuple(out.shape)}"
        )
    _dispatch.require_same_device("gguf_dequantize", weight=blocks, out=out)
    assert _dispatch.kernels is not None
    args = _dispatch.kernel_args(
        _dispatch.kernels.GgufDequantizeArgs, out=out.data_ptr(), ldo=out.stride(0),
        weight=blocks.data_ptr(), row_bytes=blocks.shape[1], n=n, k=k, ggml_type=int(qtype),
        dtype=code,
    )  # fmt: skip
    with _dispatch.on_device(blocks.device):
        status = _dispatch.kernels.gguf_dequantize(args, _dispatch.stream_handle(blocks.device))
    _dispatch.check("gguf_dequantize", status)
    return out
