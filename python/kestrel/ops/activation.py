"""Gated activation ops: the CUDA kernel on GPU tensors, the torch reference elsewhere (a CUDA
input the kernel cannot take is a logged fallback, an error under graph capture). The model's
MLP picks `silu_and_mul` or `silu_and_mul_reference` at construction."""

from __future__ import annotations

import torch

from kestrel.ops import _dispatch


def _check_silu_and_mul_args(x: torch.Tensor) -> None:
    if x.dim() < 1 or x.shape[-1] % 2 != 0:
        raise ValueError(
            f"silu_and_mul expects x [..., 2 * intermediate] with an even last dim; "
            f"got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"silu_and_mul expects a floating-point x; got dtype {x.dtype}")


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU gate: ``silu(gate) * up`` where ``x = cat([gate, up], dim=-1)``.

    Args:
        x: [num_tokens, 2 * intermediate], float dtype; the first half of the last dimension is the
            gate projection, the second half the up projection.

    Returns:
        A new tensor [num_tokens, intermediate] in ``x.dtype``. The math runs in fp32 and is
        rounded once at the end. ``x`` is not modified.
    """
    _check_silu_and_mul_args(x)
    half = x.shape[-1] // 2
    gate = x[..., :half].float()
    up = x[..., half:].float()
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU gate (see :func:`silu_and_mul_reference`); one fused kernel pass on CUDA fp16/bf16
    tensors (x is made contiguous first if it is not)."""
    _check_silu_and_mul_args(x)
    if not _dispatch.use_kernels(x):
        return silu_and_mul_reference(x)
    code = _dispatch.dtype_code(x.dtype)
    if code is None:
        _dispatch.reference_fallback("silu_and_mul", f"x {x.dtype}")
        return silu_and_mul_reference(x)
    x = x.contiguous()
    inter = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], inter), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    vec8 = inter % 8 == 0 and _dispatch.aligned16(x, out)
    assert _dispatch.kernels is not None
    with _dispatch.on_device(x.device):
        status = _dispatch.kernels.silu_and_mul(
            out.data_ptr(),
            x.data_ptr(),
            x.numel() // x.shape[-1],
            inter,
            code,
            vec8,
            _dispatch.stream_handle(x.device),
        )
    _dispatch.check("silu_and_mul", status)
    return out
