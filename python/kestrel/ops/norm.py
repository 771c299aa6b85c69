"""RMSNorm ops: the CUDA kernel on GPU tensors, the torch reference (the oracle) elsewhere.

`rms_norm` / `fused_add_rms_norm` dispatch (a CUDA input the kernel cannot take falls back to
the reference through `_dispatch.reference_fallback`: logged once, an error under graph
capture); the `*_reference` functions always run the reference. `layers.RMSNorm` picks one of
the two at construction."""

from __future__ import annotations

import torch

from kestrel.ops import _dispatch


def _check_norm_args(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    if x.dim() < 1 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"rms_norm expects x [..., hidden] and weight [hidden]; got x {tuple(x.shape)} "
            f"and weight {tuple(weight.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"rms_norm expects a floating-point x; got dtype {x.dtype}")
    if not eps > 0.0:
        raise ValueError(f"rms_norm eps must be > 0; got {eps}")


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Root-mean-square normalization over the last dimension.

    Args:
        x: [num_tokens, hidden], any float dtype (leading dims other than one are also accepted).
        weight: [hidden], any float dtype.
        eps: added to the mean square before the reciprocal square root; must be > 0.

    Returns:
        A new tensor shaped like ``x`` in ``x.dtype``:
        ``(weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)).to(x.dtype)``, where the mean and
        the normalization run in fp32 and the normalized value is rounded to ``x.dtype`` BEFORE the
        weight multiply (the Hugging Face Llama order). ``x`` is not modified.
    """
    _check_norm_args(x, weight, eps)
    x_fp32 = x.float()
    mean_square = x_fp32.pow(2).mean(dim=-1, keepdim=True)  # [num_tokens, 1], fp32
    normed = (x_fp32 * torch.rsqrt(mean_square + eps)).to(x.dtype)
    return (weight * normed).to(x.dtype)


def fused_add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    """Residual add followed by RMSNorm, both in place.

    Args:
        x: [num_tokens, hidden], float dtype. On return holds ``rms_norm(x + residual)``.
        residual: same shape and dtype as ``x``. On return holds ``x + residual`` (the sum is
            computed and rounded in ``residual.dtype``).
        weight: [hidden].
        eps: as in :func:`rms_norm`.

    Returns None; both ``x`` and ``residual`` are overwritten (their storage is reused).
    """
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise ValueError(
            "fused_add_rms_norm expects x and residual of the same shape and dtype; got "
            f"x {tuple(x.shape)} {x.dtype} and residual {tuple(residual.shape)} {residual.dtype}"
        )
    _check_norm_args(x, weight, eps)
    residual.add_(x)
    x.copy_(rms_norm_reference(residual, weight, eps))


# Longest row the kernels keep in registers (cuda/norm.cuh: 1024 threads x 4 vectors).
_MAX_VECTORS_PER_ROW = 1024 * 4


def _kernel_dtype(op: str, x: torch.Tensor, weight: torch.Tensor) -> int | None:
    """The kernel dtype code when the kernel should run on (x, weight), else None (a CUDA x
    the kernel cannot take is a logged fallback)."""
    if not _dispatch.use_kernels(x):
        return None
    _dispatch.require_same_device(op, x=x, weight=weight)
    code = _dispatch.dtype_code(x.dtype)
    if code is None or weight.dtype != x.dtype or not weight.is_contiguous():
        why = f"x {x.dtype}, weight {weight.dtype} (contiguous: {weight.is_contiguous()})"
        _dispatch.reference_fallback(op, why)
        return None
    return code


def _vector_width(
    hidden: int, tensors: tuple[torch.Tensor, ...], strides: tuple[int, ...] = ()
) -> int | None:
    """8 when 16-byte vectors fit (hidden, row strides % 8 == 0 and aligned bases), else 1; None
    when the row is too long for the kernel."""
    fits = hidden % 8 == 0 and all(s % 8 == 0 for s in strides) and _dispatch.aligned16(*tensors)
    vec = 8 if fits else 1
    return vec if hidden // vec <= _MAX_VECTORS_PER_ROW else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension; see :func:`rms_norm_reference` for the exact numerics.

    On CUDA fp16/bf16 tensors (weight of the same dtype) this runs the fused kernel: ``x`` may be
    [rows, hidden] or [outer, inner, hidden] with any outer/inner strides (e.g. per-head q/k
    views into a fused qkv projection) as long as the last dim is contiguous; other layouts are
    copied first. The result is a new contiguous tensor shaped like ``x``.
    """
    _check_norm_args(x, weight, eps)
    code = _kernel_dtype("rms_norm", x, weight)
    if code is None:
        return rms_norm_reference(x, weight, eps)
    hidden = x.shape[-1]
    if x.stride(-1) != 1 or x.dim() > 3:
        x = x.contiguous()
    # [outer, inner, hidden]; a 2-D x keeps its row stride (reshape returns the same view).
    x3 = x if x.dim() == 3 else x.reshape(-1, hidden).unsqueeze(0)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    # Row strides that matter (a size-1 dim's stride is never used).
    strides = tuple(x3.stride(d) for d in (0, 1) if x3.shape[d] > 1)
    vec = _vector_width(hidden, (x3, weight), strides)
    if vec is None:
        _dispatch.reference_fallback("rms_norm", f"a row of {hidden} elements is too long")
        return rms_norm_reference(x, weight, eps)
    assert _dispatch.kernels is not None
    with _dispatch.on_device(x.device):
        args = _dispatch.kernel_args(
            _dispatch.kernels.RmsNormArgs,
            out=out.data_ptr(),
            x=x3.data_ptr(),
            weight=weight.data_ptr(),
            rows=x3.shape[0] * x3.shape[1],
            inner=x3.shape[1],
            stride_outer=x3.stride(0),
            stride_inner=x3.stride(1),
            hidden=hidden,
            eps=float(eps),
            dtype=code,
            vec8=vec == 8,
        )
        status = _dispatch.kernels.rms_norm(args, _dispatch.stream_handle(x.device))
    _dispatch.check("rms_norm", status)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    """In place: ``residual <- x + residual``, ``x <- rms_norm(residual)``; see
    :func:`fused_add_rms_norm_reference`. On contiguous CUDA fp16/bf16 tensors this is one fused
    kernel pass (one read of x and residual, one write of each)."""
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise ValueError(
            "fused_add_rms_norm expects x and residual of the same shape and dtype; got "
            f"x {tuple(x.shape)} {x.dtype} and residual {tuple(residual.shape)} {residual.dtype}"
        )
    _check_norm_args(x, weight, eps)
    code = _kernel_dtype("fused_add_rms_norm", x, weight)
    if code is not None:
        _dispatch.require_same_device("fused_add_rms_norm", x=x, residual=residual)
    hidden = x.shape[-1]
    contiguous = x.is_contiguous() and residual.is_contiguous()
    vec = _vector_width(hidden, (x, residual, weight)) if code is not None else None
    if code is not None and (not contiguous or vec is None):
        why = f"contiguous x and residual: {contiguous}, hidden {hidden}"
        _dispatch.reference_fallback("fused_add_rms_norm", why)
    if code is None or not contiguous or vec is None:
        fused_add_rms_norm_reference(x, residual, weight, eps)
        return
    assert _dispatch.kernels is not None
    with _dispatch.on_device(x.device):
        args = _dispatch.kernel_args(
            _dispatch.kernels.FusedAddRmsNormArgs,
            x=x.data_ptr(),
            residual=residual.data_ptr(),
            weight=weight.data_ptr(),
            rows=x.numel() // hidden,
            hidden=hidden,
            eps=float(eps),
            dtype=code,
            vec8=vec == 8,
        )
        status = _dispatch.kernels.fused_add_rms_norm(args, _dispatch.stream_handle(x.device))
    _dispatch.check("fused_add_rms_norm", status)
