"""FP8 (e4m3) KV caches: the element type, quantization on write and dequantization on read.

A KV cache holds the model's dtype ("auto") or float8 e4m3fn codes (`--kv-cache-dtype fp8`).
An FP8 cache of one layer has two per-tensor scales, k_scale and v_scale (floats > 0; 1.0
unless the checkpoint gives calibrated ones): the stored code of x is
``e4m3(clamp(x / scale, -448, 448))``, rounded to nearest even (saturating, so a large value
never becomes NaN or inf), and reading it back gives ``code * scale``. The K/V rows are first
rounded to the compute dtype (they are tensors of that dtype), then divided by the scale, so
the reference and the kernels encode the same values.

Scales of a cache of the model's dtype are ignored (there is nothing to undo).
"""

from __future__ import annotations

import torch

from kestrel.config import ConfigError

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
KV_CACHE_DTYPE_NAMES = {"fp8": FP8_KV_DTYPE, "fp8_e4m3": FP8_KV_DTYPE}
# Compute capability from which GPUs convert e4m3 in hardware (Ada 8.9, Hopper 9.0).
FP8_MIN_CAPABILITY = (8, 9)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == FP8_KV_DTYPE


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache element type of EngineConfig.kv_cache_dtype `name` for a model of
    `model_dtype`: "auto" is the model's, "fp8" / "fp8_e4m3" float8 e4m3fn."""
    if name == "auto":
        return model_dtype
    if name not in KV_CACHE_DTYPE_NAMES:
        allowed = ", ".join(("auto", *KV_CACHE_DTYPE_NAMES))
        raise ConfigError(
            "kv_cache_dtype", f"kv_cache_dtype = {name!r} is invalid; allowed: {allowed}"
        )
    return KV_CACHE_DTYPE_NAMES[name]


def require_fp8_kv_device(device: torch.device) -> None:
    """An FP8 KV cache on a CUDA device needs compute capability 8.9+ (e4m3 conversions in
    hardware): a ConfigError naming the GPU otherwise. CPU runs the torch reference."""
    if device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise ConfigError(
            "kv_cache_dtype",
            f"kv_cache_dtype fp8 needs a GPU of compute capability >= 8.9 (Ada, Hopper); "
            f"{name} has {capability[0]}.{capability[1]}; use kv_cache_dtype auto",
        )


def check_scale(name: str, scale: float) -> float:
    """A KV scale as a float, finite and > 0 (ValueError naming it otherwise)."""
    value = float(scale)
    if not (value > 0 and value != float("inf")):
        raise ValueError(f"{name} = {scale!r} is invalid; allowed: a finite float > 0")
    return value


def quantize_kv(x: torch.Tensor, scale: float) -> torch.Tensor:
    """e4m3fn codes of x / scale, saturated to +-FP8_MAX (NaN stays NaN)."""
    y = x.float()
    if scale != 1.0:
        # A 0-d tensor on x's device: a true division on every device (CUDA turns a Python
        # scalar divisor into a multiply by its reciprocal), as the kernels do.
        y = y / torch.tensor(scale, dtype=torch.float32, device=x.device)
    return y.clamp(-FP8_MAX, FP8_MAX).to(FP8_KV_DTYPE)


def to_cache_dtype(x: torch.Tensor, cache_dtype: torch.dtype, scale: float) -> torch.Tensor:
    """K or V rows as the cache stores them: FP8 codes (see quantize_kv) or a plain cast."""
    if is_fp8(cache_dtype):
        return quantize_kv(x, scale)
    return x.to(cache_dtype)


def dequantize_kv(cache: torch.Tensor, scale: float) -> torch.Tensor:
    """Gathered cache rows in fp32: FP8 codes times scale; other dtypes as they are."""
    if is_fp8(cache.dtype):
        out = cache.float()
        return out * scale if scale != 1.0 else out
    return cache.float()
