"""Choosing between the CUDA kernels (``kestrel._kernels``) and the torch references.

An op runs its kernel when the kernels module was built, ``KESTREL_DISABLE_KERNELS`` is not
"1", its tensors live on a CUDA device and their dtype/layout is one the kernel handles; any
other input takes the torch reference (the oracle), so behaviour never depends on the build.
Kernels are launched on torch's current stream of the tensors' device and return a cudaError_t
code; a non-zero code raises :class:`KernelError` naming the op.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from types import ModuleType

import torch

DISABLE_ENV = "KESTREL_DISABLE_KERNELS"


def _load_kernels() -> ModuleType | None:
    try:
        from kestrel import _kernels  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _kernels


kernels: ModuleType | None = _load_kernels()

_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1}


class KernelError(RuntimeError):
    """A CUDA kernel launch or execution error, raised by the op that launched it."""


def kernels_available() -> bool:
    """True when kestrel._kernels is importable and not disabled by the environment."""
    return kernels is not None and os.environ.get(DISABLE_ENV) != "1"


def use_kernels(x: torch.Tensor) -> bool:
    """True when an op on ``x`` should try the CUDA kernel (x on CUDA, kernels available)."""
    return x.is_cuda and kernels_available()


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
    """cudaStream_t (as an int) of torch's current stream on ``device``."""
    return torch.cuda.current_stream(device).cuda_stream


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
