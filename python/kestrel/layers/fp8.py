"""FP8 (e4m3) linear layers: per-output-channel weight scales, dynamic per-token activation
scales, one `torch._scaled_mm` per projection.

Numbers: a quantized row r of a matrix holds q[r, :] (float8_e4m3fn) and scale[r] (float32)
with row[r, :] ~= q[r, :] * scale[r]; the row's largest |value| maps to FP8_MAX (448). The
weight W [N, K] is quantized per output channel (row), the activation x [T, K] per token (row),
so x @ W^T = (q_x @ q_W^T) * scale_x[T, 1] * scale_W[1, N] exactly as `torch._scaled_mm`'s
row-wise scaling computes it (float32 accumulation).

Weights come either from a BF16/FP16 checkpoint (loaded in the model dtype, quantized once in
`process_weights_after_loading`) or from an FP8 checkpoint (`serialized`: float8_e4m3fn weights
and a `weight_scale` per output channel, or one per checkpoint tensor, which is expanded to one
per channel after loading). Either way the layer ends with `weight` [N, K] float8_e4m3fn (row
major, so `weight.t()` is the column-major [K, N] operand `_scaled_mm` wants) and
`weight_scale` [1, N] float32.

Decode rows (M <= 8 tokens, CUDA, op "dense_gemv_fp8" allowed: _dispatch.UNVERIFIED_OPS) skip
the activation quantization and `_scaled_mm`: the skinny GEMM kernel reads the e4m3 weight and
its scales with the activations in the model dtype (W8A16, layers/dense_gemv_linear.py), one
launch instead of five, and more accurate (x is not rounded to e4m3).

`torch._scaled_mm` runs on CUDA GPUs of compute capability 8.9 or higher and, in torch 2.13, on
the CPU (used by the tests); `require_fp8_device` is the engine's check.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable

import torch
from torch import nn

from kestrel.config import ConfigError
from kestrel.layers import dense_gemv_linear
from kestrel.layers.linear import Device, LinearBase, LinearMethodBase, new_parameter

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
# Smallest scale: an all-zero row gets this instead of 0 (so q = 0, no division by zero);
# the smallest normal float32, so that it never coarsens a row of small but real values.
MIN_SCALE = float(torch.finfo(torch.float32).tiny)
# torch._scaled_mm on CUDA needs K and N (this rank's) to be multiples of 16.
CUDA_ALIGNMENT = 16
WEIGHT_SCALE_STRATEGIES = ("channel", "tensor")

Loader = Callable[..., None]


# ---- quantization math (torch ops; runs anywhere) ---------------------------------------------


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, cols] (float) -> (q [rows, cols] float8_e4m3fn, scale [rows, 1] float32) with
    x ~= q * scale: each row's largest |value| becomes +-448.

    Four kernels, no host synchronization (decode CUDA graphs capture it): the max-abs
    reduction (in float32), two in-place ops on the [rows, 1] scales, and one division computed
    in float32 that stores e4m3 directly (round to nearest). No clamp is needed: scale >=
    amax / 448, so |x / scale| <= 448 up to one float32 rounding, which rounds back to 448
    (e4m3fn's largest finite value; the conversion gives NaN only from 480 up)."""
    amax = torch.linalg.vector_norm(x, ord=math.inf, dim=-1, keepdim=True, dtype=torch.float32)
    scale = amax.div_(FP8_MAX).clamp_(min=MIN_SCALE)  # [rows, 1]
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    torch.div(x, scale, out=q)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 matrix q * scale (scale [rows, 1] or [rows])."""
    return q.float() * scale.float().reshape(-1, 1)


def fp8_matmul(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """(x_q * x_scale) @ (w_q * w_scale^T)^T through `torch._scaled_mm`.

    x_q [T, K] e4m3 (row major), x_scale [T, 1] float32, w_q [N, K] e4m3 (row major),
    w_scale [1, N] float32 -> [T, N] in out_dtype. On CUDA the row-wise kernels write bf16 only
    (CUTLASS, Ada) or best (cuBLAS, Hopper), so another dtype is a cast of the bf16 result.
    """
    mm_dtype = torch.bfloat16 if x_q.is_cuda else out_dtype
    out = torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=mm_dtype)
    return out if out.dtype == out_dtype else out.to(out_dtype)


def fp8_matmul_reference(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The oracle of `fp8_matmul`: both operands dequantized to float32, one float32 matmul."""
    return (dequantize_rows(x_q, x_scale) @ dequantize_rows(w_q, w_scale).t()).to(out_dtype)


# ---- the device check -------------------------------------------------------------------------


def fp8_capable(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def require_fp8_device(device: torch.device | str) -> None:
    """ConfigError naming the device unless it is a GPU with FP8 tensor cores (compute
    capability >= 8.9: Ada, Hopper, Blackwell)."""
    device = torch.device(device)
    need = "an NVIDIA GPU with FP8 tensor cores (compute capability 8.9 or higher: Ada, Hopper)"
    if device.type != "cuda":
        raise ConfigError(
            "quantization",
            f"FP8 weights (quantization='fp8' or an FP8 checkpoint) need {need}; the engine's "
            f"device is {device} (run on such a GPU, or load a BF16/FP16 checkpoint without "
            "--quantization)",
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise ConfigError(
            "quantization",
            f"FP8 weights (quantization='fp8' or an FP8 checkpoint) need {need}; {device} is "
            f"{name} of compute capability {capability[0]}.{capability[1]} (use a BF16/FP16 "
            "checkpoint without --quantization on this GPU)",
        )


# ---- the linear method ------------------------------------------------------------------------


class Fp8LinearMethod(LinearMethodBase):
    """W8A8 FP8: e4m3 weights with per-output-channel float32 scales, activations quantized per
    token at run time, the matmul in `torch._scaled_mm`, the bias added in the model dtype.

    serialized=False: the checkpoint is BF16/FP16; `weight` is created in the model dtype and
    quantized after loading. serialized=True: the checkpoint holds float8_e4m3fn weights and
    `weight_scale` tensors, per output channel ([N, 1] or [N]) or per tensor (one per checkpoint
    tensor, so a fused q/k/v layer holds three).
    """

    def __init__(self, serialized: bool = False, weight_scale: str = "channel") -> None:
        if weight_scale not in WEIGHT_SCALE_STRATEGIES:
            raise ValueError(
                f"weight_scale={weight_scale!r} is not supported; supported: "
                f"{', '.join(WEIGHT_SCALE_STRATEGIES)}"
            )
        self.serialized = serialized
        self.weight_scale = weight_scale

    def create_weights(
        self, layer: LinearBase, params_dtype: torch.dtype, device: Device, weight_loader: object
    ) -> None:
        rows, cols = layer.output_size_per_partition, layer.input_size_per_partition
        _check_cuda_sizes(layer, device)
        assert callable(weight_loader)
        weight_dtype = FP8_DTYPE if self.serialized else params_dtype
        weight = new_parameter((rows, cols), weight_dtype, device)
        weight.input_dim = 1
        weight.output_dim = 0
        weight.weight_loader = (
            _fp8_tensor_loader(weight_loader) if self.serialized else weight_loader
        )
        layer.register_parameter("weight", weight)
        # M <= 8 rows: W8A16 through the skinny GEMM kernel (None: quantize + _scaled_mm only)
        layer.gemv_dtype = dense_gemv_linear.gemv_dtype(device, params_dtype, cols, fp8=True)
        if not self.serialized:
            return
        if self.weight_scale == "channel":
            scale = new_parameter((rows,), torch.float32, device)
            scale.output_dim = 0  # sharded with the rows (column layers); replicated otherwise
            scale.weight_loader = _channel_scale_loader(weight_loader)
        else:
            scale = new_parameter((len(layer.output_partition_sizes),), torch.float32, device)
            scale.weight_loader = _tensor_scale_loader(layer)
        layer.register_parameter("weight_scale", scale)

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        if getattr(layer, "fp8_ready", False):
            return  # already quantized (the loaders call this once; a second call is a no-op)
        weight = layer.weight.data
        if self.serialized:
            scale = layer.weight_scale.data
            if self.weight_scale == "tensor":  # one scale per part (q, k, v) -> one per row
                sizes = torch.tensor(layer.output_partition_sizes, device=scale.device)
                scale = torch.repeat_interleave(scale, sizes)
            q = weight
        else:
            q, scale = quantize_rows(weight)
        layer.weight = nn.Parameter(q.contiguous(), requires_grad=False)  # [N, K] e4m3
        layer.weight_scale = nn.Parameter(  # [1, N] float32
            scale.reshape(1, -1).float().contiguous(), requires_grad=False
        )
        layer.fp8_ready = True

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # x [T, K] -> [T, N]; any leading dims are flattened into T
        leading, cols = x.shape[:-1], x.shape[-1]
        rows = layer.weight.shape[0]
        if x.numel() == 0:
            return x.new_zeros((*leading, rows))
        if getattr(layer, "gemv_dtype", None) is not None:  # decode rows, W8A16 (else None)
            scale = layer.weight_scale.view(-1)  # [N] float32
            out = dense_gemv_linear.run_gemv(layer, x, layer.weight, scale, bias)
            if out is not None:
                return out
        x_q, x_scale = quantize_rows(x.reshape(-1, cols))
        out = fp8_matmul(x_q, x_scale, layer.weight, layer.weight_scale, x.dtype)
        if bias is not None:
            out.add_(bias)
        return out.view(*leading, rows)


def _check_cuda_sizes(layer: LinearBase, device: Device) -> None:
    """`torch._scaled_mm` on CUDA needs this rank's K and N to be multiples of 16."""
    if device is None or torch.device(device).type != "cuda":
        return
    for what, size in (
        ("input features", layer.input_size_per_partition),
        ("output features", layer.output_size_per_partition),
    ):
        if size % CUDA_ALIGNMENT != 0:
            raise ValueError(
                f"{layer.prefix}: FP8 needs {what} (per tensor-parallel rank) to be a multiple "
                f"of {CUDA_ALIGNMENT} on CUDA; got {size} (leave this model unquantized)"
            )


def _fp8_tensor_loader(weight_loader: Loader) -> Loader:
    """The layer's loader, for a float8_e4m3fn checkpoint tensor only (copying a BF16 tensor
    into an FP8 parameter would quantize it without a scale)."""

    def load(
        param: torch.Tensor,
        loaded: torch.Tensor,
        shard_id: Hashable | None = None,
        expert_id: int | None = None,
    ) -> None:
        if loaded.dtype != FP8_DTYPE:
            raise ValueError(
                f"the checkpoint declares FP8 weights, so this tensor must be float8_e4m3fn; got "
                f"{loaded.dtype} (is the module missing from the quantization config's ignore "
                "list?)"
            )
        weight_loader(param, loaded, shard_id, expert_id)

    return load


def _channel_scale_loader(weight_loader: Loader) -> Loader:
    """Per-channel scales: checkpoint [N, 1] (compressed-tensors) or [N], into [N] float32."""

    def load(
        param: torch.Tensor,
        loaded: torch.Tensor,
        shard_id: Hashable | None = None,
        expert_id: int | None = None,
    ) -> None:
        if loaded.dim() == 2 and loaded.shape[1] == 1:
            loaded = loaded[:, 0]
        if loaded.dim() != 1:
            raise ValueError(
                f"a per-channel weight_scale must be [out_features, 1] or [out_features]; got "
                f"{tuple(loaded.shape)} (block-wise scales are not supported)"
            )
        weight_loader(param, loaded, shard_id, expert_id)

    return load


def _tensor_scale_loader(layer: LinearBase) -> Loader:
    """Per-tensor scales: one scalar per checkpoint tensor; a fused layer's part i (shard_ids[i])
    goes to element i."""

    def load(
        param: torch.Tensor,
        loaded: torch.Tensor,
        shard_id: Hashable | None = None,
        expert_id: int | None = None,
    ) -> None:
        name = f"{layer.prefix}.weight_scale"
        if expert_id is not None:
            raise ValueError(f"{name}: expert_id={expert_id!r}, but no experts here")
        if loaded.numel() != 1:
            raise ValueError(
                f"{name}: a per-tensor weight_scale holds one value; got shape "
                f"{tuple(loaded.shape)} (per-channel scales need a per-channel config)"
            )
        matches = [i for i, s in enumerate(layer.shard_ids) if type(s) is type(shard_id)]
        index = next((i for i in matches if layer.shard_ids[i] == shard_id), None)
        if shard_id is None and not layer.shard_ids:
            index = 0
        if index is None:
            raise ValueError(
                f"{name}: unknown shard {shard_id!r}; expected one of {list(layer.shard_ids)}"
            )
        param.data[index].copy_(loaded.reshape(()))

    return load
