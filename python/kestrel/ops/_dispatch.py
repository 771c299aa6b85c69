"""Choosing between the CUDA kernels (``kestrel._kernels``) and the torch references.

The environment switches (``KESTREL_DISABLE_KERNELS=1``: every op takes its reference;
``KESTREL_PREFILL_KERNEL``: the prefill attention variant) are read once, into the
:class:`KernelSettings` held as ``settings`` here, when this module is imported;
:func:`refresh_settings` reads them again (a process that sets them later, before it builds an
engine). Tests that patch the environment replace ``settings`` through their monkeypatch.

Layers choose their implementation once, at construction (:func:`kernels_for` their device and
dtype): the dispatching op or the reference. A dispatching op runs its kernel when the kernels
are available and its tensors live on a CUDA device in a dtype/layout the kernel handles; a
CUDA input it cannot take goes to the reference through :func:`reference_fallback` (a warning
once per op; an error under CUDA graph capture, where the reference's host work would break the
graph). CPU inputs take the reference silently, so behaviour never depends on the build.
Kernels are launched on torch's current stream of the tensors' device and return a cudaError_t
code; a non-zero code raises :class:`KernelError` naming the op.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

DISABLE_ENV = "KESTREL_DISABLE_KERNELS"
# "auto" (wgmma on sm_90 for head_dim 64/128, else mma.sync), "mma" or "wgmma" (for tests and
# benchmarks); checked when an attention backend is built (attention_cuda.prefill_variant_code).
PREFILL_KERNEL_ENV = "KESTREL_PREFILL_KERNEL"


# Kernels that are not on by default: merged before any GPU ran them (written and compiled on a
# machine without one), or verified but not yet faster than the path they would replace. They
# run only with KESTREL_UNVERIFIED_KERNELS=1 (their CUDA tests set it) until a device run has
# passed their tests and measured a gain, which takes them off this list; until then their ops
# take the torch reference on CUDA too. The GGUF kernels pass their tests on the H200 but a
# Q4_K_M 7B decodes at 6.49 ms per token with them against 4.85 ms dequantized to BF16
# (docs/performance.md), so GGUF files are still dequantized at load by default.
UNVERIFIED_ENV = "KESTREL_UNVERIFIED_KERNELS"
# The skinny dense GEMM (ops/dense_gemv.py) for decode rows M <= 8 is gated per weight kind:
# dense_gemv_fp8 (FP8 linears, W8A16) passed its tests on the H200 and is on (7B FP8 batch-1 TPOT
# 5.91 -> 3.82 ms); dense_gemv_bf16 (fp16/bf16 linears) passes too but made the 7B BF16 step
# slower (4.50 -> 4.61 ms, same run), so it stays opt-in.
# fp8_kv_cache: the rotary + KV-write, decode and prefill kernels over float8 e4m3 KV caches
# (--kv-cache-dtype fp8) passed their tests on the H200 (tests/kernels/test_fp8_kv_kernels.py,
# tests/gpu/test_fp8_kv_gpu.py: 319 tests, decode graphs with an FP8 cache equal to eager), so
# they are on; the name stays the switch that gates them.
UNVERIFIED_OPS: frozenset[str] = frozenset({"gguf_gemv", "gguf_dequantize", "dense_gemv_bf16"})
FP8_KV_OP = "fp8_kv_cache"  # the kernel_verified() name of the FP8 KV-cache kernels


@dataclass(frozen=True)
class KernelSettings:
    """The kernels' environment switches, read once (see the module docstring)."""

    disable_kernels: bool  # KESTREL_DISABLE_KERNELS == "1"
    prefill_kernel: str  # KESTREL_PREFILL_KERNEL, default "auto"
    unverified_kernels: bool = False  # KESTREL_UNVERIFIED_KERNELS == "1"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> KernelSettings:
        return cls(
            disable_kernels=environ.get(DISABLE_ENV) == "1",
            prefill_kernel=environ.get(PREFILL_KERNEL_ENV, "auto"),
            unverified_kernels=environ.get(UNVERIFIED_ENV) == "1",
        )


settings: KernelSettings = KernelSettings.from_env()


def refresh_settings() -> KernelSettings:
    """Read the environment switches again (they apply to what is built from now on)."""
    global settings
    settings = KernelSettings.from_env()
    return settings


def _load_kernels() -> ModuleType | None:
    try:
        from kestrel import _kernels  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _kernels


kernels: ModuleType | None = _load_kernels()

_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1}
FP8_CODE = 2  # kestrel::kFloat8E4M3: a KV cache's (kv_dtype) or a weight's storage type


class KernelError(RuntimeError):
    """A CUDA kernel launch or execution error, raised by the op that launched it."""


def kernels_available() -> bool:
    """True when kestrel._kernels is importable and not disabled by the settings."""
    return kernels is not None and not settings.disable_kernels


def kernel_verified(op: str) -> bool:
    """False for an op whose kernel has not run on a GPU yet, unless KESTREL_UNVERIFIED_KERNELS
    asks for it (see UNVERIFIED_OPS)."""
    return op not in UNVERIFIED_OPS or settings.unverified_kernels


def use_kernels(x: torch.Tensor) -> bool:
    """True when an op on ``x`` should try the CUDA kernel (x on CUDA, kernels available)."""
    return x.is_cuda and kernels_available()


def kernels_for(device: torch.device | str | None, dtype: torch.dtype) -> bool:
    """True when the kernels run for tensors of this device and dtype (a layer's choice at
    construction: CUDA, fp16/bf16, kernels available). None is torch's default device."""
    where = torch.device(device) if device is not None else torch.get_default_device()
    return where.type == "cuda" and kernels_available() and dtype_code(dtype) is not None


@functools.cache
def _warn_fallback(op: str) -> None:
    logger.warning("%s: the CUDA kernel cannot take these inputs; using the torch reference", op)


def reference_fallback(op: str, why: str) -> None:
    """A kernel-dispatching op is about to run its reference on a CUDA tensor: a warning the
    first time for `op`, and a RuntimeError while a CUDA graph is being captured."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"{op} fell back to the torch reference under capture: {why}")
    _warn_fallback(op)


def dtype_code(dtype: torch.dtype) -> int | None:
    """Kernel dtype code (0 fp16, 1 bf16) or None when the kernels do not handle ``dtype``."""
    return _DTYPE_CODES.get(dtype)


def require_same_device(op: str, **tensors: torch.Tensor) -> None:
    """Raise ValueError naming the op and the tensors when they are not on one device."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device; got {where}")


def aligned16(*tensors: torch.Tensor) -> bool:
    """True when every tensor's first element sits on a 16-byte boundary."""
    return all(t.data_ptr() % 16 == 0 for t in tensors)


def stream_handle(device: torch.device) -> int:
    """cudaStream_t (as an int) of torch's current stream on ``device`` (called per kernel
    launch: the raw getter, without building a torch.cuda.Stream object each time)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch._C._cuda_getCurrentRawStream(index)


@contextlib.contextmanager
def on_device(device: torch.device) -> Iterator[None]:
    """Make ``device`` current for the launch (a no-op when it already is)."""
    if device.index is None or device.index == torch.cuda.current_device():
        yield
    else:
        with torch.cuda.device(device):
            yield


def kernel_args(struct_type: type, **fields: float) -> object:
    """A kernel parameter struct (e.g. ``kernels.DecodeAttentionArgs``) with its fields set by
    name: pointers as ``data_ptr()`` integers, strides in elements. An unknown field name
    raises AttributeError; a field left unset keeps the launcher-rejected default (see
    cuda/kernels.h)."""
    args = struct_type()
    for name, value in fields.items():
        setattr(args, name, value)
    return args


def check(op: str, code: int) -> None:
    """Raise KernelError naming ``op`` when a launcher returned a non-zero cudaError_t."""
    if code != 0:
        assert kernels is not None
        raise KernelError(f"kestrel kernel {op} failed: {kernels.error_string(code)} (code {code})")


@functools.cache
def sm_count(device_index: int) -> int:
    """Number of streaming multiprocessors of a CUDA device."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count
