"""RMSNorm module over the `kestrel.ops` norm ops (the kernel-dispatching op or the reference,
chosen once at construction from the layer's device and dtype)."""

from __future__ import annotations

import torch
from torch import nn

from kestrel import ops
from kestrel.layers.linear import default_weight_loader, new_parameter
from kestrel.ops import _dispatch


class RMSNorm(nn.Module):
    """y = rms_norm(x) * weight over the last dim; weight [hidden_size]."""

    def __init__(
        self,
        hidden_size: int,
        eps: float,
        dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.weight = new_parameter((hidden_size,), dtype, device)
        self.weight.weight_loader = default_weight_loader
        with torch.no_grad():
            self.weight.fill_(1.0)
        # Chosen once: CUDA fp16/bf16 with the kernels available dispatches to the kernel
        # (fallbacks on odd layouts are logged); anything else runs the reference directly.
        kernels = _dispatch.kernels_for(device, dtype)
        self._rms_norm = ops.rms_norm if kernels else ops.rms_norm_reference
        self._fused_add_rms_norm = (
            ops.fused_add_rms_norm if kernels else ops.fused_add_rms_norm_reference
        )

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [num_tokens, hidden_size].

        Without residual: returns (rms_norm(x), None); x is untouched.
        With residual: in place, residual <- x + residual and x <- rms_norm(residual); returns
        (x, residual), the same tensors that were passed in.
        """
        if residual is None:
            return self._rms_norm(x, self.weight, self.eps), None
        self._fused_add_rms_norm(x, residual, self.weight, self.eps)
        return x, residual
