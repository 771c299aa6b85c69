"""The decode path of the dense linear methods: M = 1..8 token rows through the skinny GEMM
kernel (kestrel.ops.dense_gemv) instead of cuBLAS (16-bit weights, `UnquantizedLinearMethod`)
or activation quantization + `torch._scaled_mm` (FP8 weights, `Fp8LinearMethod`: W8A16, the
activations stay in the model dtype).

A layer decides once, at construction (`gemv_dtype`): the activation dtype the kernel runs for,
or None (CPU, kernels off or not verified, K the kernel cannot take). `run_gemv` then takes the
kernel for an input it can take and returns None otherwise, so the caller runs its usual path:
more than 8 rows (prefill, large decode batches), misaligned or strided rows, another dtype.
The decode CUDA graphs capture whichever path the captured batch size takes: sizes 1..8 the
kernel, larger ones the matmul.
"""

from __future__ import annotations

import torch

from kestrel.ops import dense_gemv as gemv_ops

Device = torch.device | str | None  # as layers/linear.py (which imports this module)


def gemv_dtype(device: Device, dtype: torch.dtype, k: int, fp8: bool) -> torch.dtype | None:
    """The activation dtype of this layer's GEMV path (None: no GEMV). k: this rank's input
    features (a multiple of 8; 16 for fp8 weights)."""
    weight_dtype = gemv_ops.FP8_DTYPE if fp8 else dtype
    if k <= 0 or k % gemv_ops.k_multiple(weight_dtype) != 0:
        return None
    return dtype if gemv_ops.gemv_enabled(device, dtype, fp8) else None


def run_gemv(
    layer: torch.nn.Module,
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor | None:
    """(x @ weight^T) * scale + bias through the kernel, [..., N] like x's leading dims, when the
    layer has a GEMV path (`layer.gemv_dtype`) and the kernel takes these inputs; else None."""
    dtype = getattr(layer, "gemv_dtype", None)
    if dtype is None or x.dtype != dtype:
        return None
    if x.dim() == 2:
        rows = x
    elif x.dim() > 2 and x.is_contiguous():
        rows = x.view(-1, x.shape[-1])
    else:
        return None
    if not gemv_ops.gemv_input_ok(rows) or not gemv_ops.gemv_shape_ok(weight, dtype):
        return None
    if bias is not None and (bias.dtype != dtype or not bias.is_contiguous()):
        return None
    out = gemv_ops.dense_gemv(rows, weight, scale, bias)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[-1])
