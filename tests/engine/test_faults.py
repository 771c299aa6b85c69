"""Unit tests of kestrel.engine.faults: what counts as a device failure, the error message."""

from __future__ import annotations

import torch

from kestrel.engine.faults import error_message, is_device_failure
from kestrel.ops import KernelError


def test_is_device_failure():
    assert is_device_failure(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert is_device_failure(torch.cuda.OutOfMemoryError("out of memory"))
    if hasattr(torch, "AcceleratorError"):
        assert is_device_failure(torch.AcceleratorError("an illegal memory access"))
    assert is_device_failure(KernelError("kestrel kernel paged_attention failed (code 700)"))
    assert is_device_failure(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert is_device_failure(RuntimeError("x.cu:12: block: [0,0,0]: device-side assert triggered"))
    assert is_device_failure(RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED"))
    assert not is_device_failure(RuntimeError("value cannot be converted to type int32"))
    assert not is_device_failure(ValueError("CUDA error: only RuntimeErrors carry these"))
    assert not is_device_failure(IndexError("index 600 is out of bounds"))
    assert not is_device_failure(KeyboardInterrupt())
    # Raised from (or while handling) a device failure: still one.
    try:
        try:
            raise RuntimeError("CUDA error: unspecified launch failure")
        except RuntimeError as inner:
            raise ValueError("wrapped") from inner
    except ValueError as outer:
        assert is_device_failure(outer)
    try:
        try:
            raise torch.OutOfMemoryError("out of memory")
        except RuntimeError:
            raise TypeError("while handling")  # implicitly chained: __context__
    except TypeError as outer:
        assert is_device_failure(outer)


def test_error_message_is_one_line():
    exc = ValueError("first line\nsecond\tline   " + "x" * 1000)
    message = error_message(exc, "sampling")
    assert "\n" not in message and "\t" not in message
    assert message.startswith("ValueError: first line second line xxx")
    assert message.endswith("... (this request's sampling failed)")
    assert len(message) < 600
    assert error_message(KeyError("k"), "output processing") == (
        "KeyError: 'k' (this request's output processing failed)"
    )
