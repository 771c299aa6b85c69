"""RMSNorm reference ops (torch-native oracle for the CUDA norm kernels)."""

from __future__ import annotations

import torch


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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
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


def fused_add_rms_norm(
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
    x.copy_(rms_norm(residual, weight, eps))
