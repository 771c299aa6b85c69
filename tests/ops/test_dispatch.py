"""Kernel dispatch on CPU: the environment switches are read once (into _dispatch.settings),
layers choose their op at construction, and a fallback from a kernel-dispatching op to the
reference on a (pretend) CUDA input warns once per op and is an error under graph capture."""

from __future__ import annotations

import logging

import pytest
import torch

from kestrel import ops
from kestrel.layers import PagedAttention, RMSNorm
from kestrel.ops import _dispatch


def test_settings_are_read_once_and_on_refresh(monkeypatch):
    monkeypatch.setattr(_dispatch, "settings", _dispatch.settings)  # restored after the test
    monkeypatch.setenv(_dispatch.DISABLE_ENV, "1")
    monkeypatch.setenv(_dispatch.PREFILL_KERNEL_ENV, "mma")
    before = _dispatch.settings
    assert _dispatch.settings is before  # no op or call re-reads the environment
    fresh = _dispatch.refresh_settings()
    assert fresh is _dispatch.settings
    assert fresh == _dispatch.KernelSettings(disable_kernels=True, prefill_kernel="mma")
    assert _dispatch.KernelSettings.from_env({}) == _dispatch.KernelSettings(False, "auto")
    assert not _dispatch.KernelSettings.from_env({_dispatch.DISABLE_ENV: "0"}).disable_kernels


def test_kernels_for_device_and_dtype(monkeypatch):
    monkeypatch.setattr(_dispatch, "kernels", object())  # pretend the module is built
    monkeypatch.setattr(_dispatch, "settings", _dispatch.KernelSettings(False, "auto"))
    assert _dispatch.kernels_for("cuda", torch.bfloat16)
    assert _dispatch.kernels_for(torch.device("cuda", 0), torch.float16)
    assert not _dispatch.kernels_for("cuda", torch.float32)
    assert not _dispatch.kernels_for("cpu", torch.bfloat16)
    assert not _dispatch.kernels_for(None, torch.bfloat16)  # torch's default device: the CPU
    monkeypatch.setattr(_dispatch, "settings", _dispatch.KernelSettings(True, "auto"))
    assert not _dispatch.kernels_for("cuda", torch.bfloat16)
    monkeypatch.setattr(_dispatch, "kernels", None)
    monkeypatch.setattr(_dispatch, "settings", _dispatch.KernelSettings(False, "auto"))
    assert not _dispatch.kernels_for("cuda", torch.bfloat16)


def test_layers_choose_their_op_at_construction(monkeypatch):
    norm = RMSNorm(8, 1e-6, torch.float32, "cpu")
    assert norm._rms_norm is ops.rms_norm_reference
    assert norm._fused_add_rms_norm is ops.fused_add_rms_norm_reference
    attn = PagedAttention(4, 2, 8, 0.3, dtype=torch.float32, device="cpu")
    assert attn._rotary_and_cache is ops.rotary_embedding_and_cache_reference
    assert PagedAttention(4, 2, 8, 0.3)._rotary_and_cache is ops.rotary_embedding_and_cache
    # Where the kernels would run, the layers hold the dispatching ops.
    monkeypatch.setattr(_dispatch, "kernels_for", lambda device, dtype: True)
    norm = RMSNorm(8, 1e-6, torch.float32, "cpu")
    assert norm._rms_norm is ops.rms_norm and norm._fused_add_rms_norm is ops.fused_add_rms_norm
    attn = PagedAttention(4, 2, 8, 0.3, dtype=torch.float32, device="cpu")
    assert attn._rotary_and_cache is ops.rotary_embedding_and_cache
    x = torch.randn(3, 8)
    y, _ = norm(x)  # a CPU tensor: the dispatching op takes the reference silently
    assert torch.equal(y, ops.rms_norm_reference(x, norm.weight, 1e-6))


def _fallback_calls():
    """Each op on fp32 inputs (no kernel takes fp32), as if they lived on a CUDA device."""
    x, w = torch.randn(4, 16), torch.ones(16)
    positions = torch.arange(4)
    q, k, v = torch.randn(4, 2, 8), torch.randn(4, 1, 8), torch.randn(4, 1, 8)
    cos_sin = ops.compute_cos_sin_cache(8, 16, 10000.0, None)
    cache = (torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8))
    slots = torch.arange(4)
    return {
        "rms_norm": lambda: ops.rms_norm(x, w, 1e-6),
        "fused_add_rms_norm": lambda: ops.fused_add_rms_norm(x.clone(), x.clone(), w, 1e-6),
        "silu_and_mul": lambda: ops.silu_and_mul(x),
        "rotary_embedding_and_cache": lambda: ops.rotary_embedding_and_cache(
            positions, q.clone(), k.clone(), v, cos_sin, *cache, slots
        ),
    }


@pytest.mark.parametrize("op", list(_fallback_calls()))
def test_a_fallback_warns_once_per_op(op, monkeypatch, caplog):
    monkeypatch.setattr(_dispatch, "use_kernels", lambda x: True)  # "a CUDA tensor"
    _dispatch._warn_fallback.cache_clear()
    call = _fallback_calls()[op]
    with caplog.at_level(logging.WARNING, logger="kestrel.ops._dispatch"):
        call()
        call()
    warnings = [r for r in caplog.records if "torch reference" in r.getMessage()]
    assert len(warnings) == 1 and op in warnings[0].getMessage()


@pytest.mark.parametrize("op", list(_fallback_calls()))
def test_a_fallback_under_capture_is_an_error(op, monkeypatch):
    monkeypatch.setattr(_dispatch, "use_kernels", lambda x: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match=f"{op} fell back to the torch reference under capture"):
        _fallback_calls()[op]()


def test_cpu_inputs_take_the_reference_silently(caplog):
    _dispatch._warn_fallback.cache_clear()
    with caplog.at_level(logging.WARNING, logger="kestrel.ops._dispatch"):
        for call in _fallback_calls().values():
            call()
    assert not caplog.records


def test_unverified_kernels_are_opt_in(monkeypatch):
    """A kernel merged before any GPU ran it stays off unless KESTREL_UNVERIFIED_KERNELS=1."""
    assert _dispatch.KernelSettings.from_env({"KESTREL_UNVERIFIED_KERNELS": "1"}).unverified_kernels
    monkeypatch.setattr(_dispatch, "settings", _dispatch.KernelSettings(False, "auto"))
    for op in _dispatch.UNVERIFIED_OPS:
        assert not _dispatch.kernel_verified(op)
    assert _dispatch.kernel_verified("rms_norm")  # verified kernels are unaffected
    monkeypatch.setattr(_dispatch, "settings", _dispatch.KernelSettings(False, "auto", True))
    assert all(_dispatch.kernel_verified(op) for op in _dispatch.UNVERIFIED_OPS)
