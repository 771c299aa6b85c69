"""The dense GEMV op on the CPU: its float32 reference, its argument checks (the kernel's limits,
named in the errors), the bit moves that widen e4m3 codes in the kernel (mirrored in torch
integer ops, against torch's own conversion, for every code), and the linear layers' choice of
the kernel (never on the CPU, so CPU behaviour is unchanged)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kestrel.layers import ReplicatedLinear, dense_gemv_linear, process_weights_after_loading
from kestrel.layers.fp8 import FP8_DTYPE, Fp8LinearMethod, fp8_matmul_reference, quantize_rows
from kestrel.ops import _dispatch
from kestrel.ops import dense_gemv as gemv_ops


def test_reference_is_the_float32_matmul_of_the_dequantized_weight():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 48, generator=g)
    q, scale = quantize_rows(w)
    x = torch.randn(3, 48, generator=g).to(torch.bfloat16)
    bias = torch.randn(24, generator=g).to(torch.bfloat16)
    out = gemv_ops.dense_gemv_reference(x, q, scale.reshape(-1), bias)
    expected = x.float() @ (q.float() * scale).t() + bias.float()
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected.to(torch.bfloat16))
    plain = gemv_ops.dense_gemv_reference(x, w.to(torch.bfloat16))
    assert torch.equal(plain, (x.float() @ w.to(torch.bfloat16).float().t()).to(torch.bfloat16))


def _widen(codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """widen_fp8 of cuda/dense_gemv.cuh in torch integer ops: uint8 codes -> dtype values."""
    mantissa = 10 if dtype == torch.float16 else 7
    shift = mantissa - 3
    hi = codes.to(torch.int32) << 8  # the code in the top byte of a 16-bit half
    bits = (hi & 0x8000) | ((hi >> (8 - shift)) & (0x7F << shift))
    moved = bits.to(torch.int16).view(dtype)
    bias = 2.0**8 if dtype == torch.float16 else 2.0**120
    return (moved.float() * bias).to(dtype)  # exact: a power of two, the result is normal


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_kernels_e4m3_bit_moves_give_every_finite_code_exactly(dtype):
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    finite = (codes & 0x7F) != 0x7F
    expected = codes.view(FP8_DTYPE).to(dtype)
    got = _widen(codes, dtype)
    assert torch.equal(got[finite].view(torch.int16), expected[finite].view(torch.int16))
    assert (got[~finite].float().abs() == 480).all()  # NaN codes: documented, never in weights


@pytest.mark.parametrize(
    ("m", "k", "wdtype", "pattern"),
    [
        (9, 64, torch.bfloat16, r"M \(rows of x\) must be in \[1, 8\]; got 9"),
        (0, 64, torch.bfloat16, r"got 0"),
        (2, 12, torch.bfloat16, r"K must be a positive multiple of 8 .* got K=12"),
        (2, 24, FP8_DTYPE, r"multiple of 16 .*float8_e4m3fn weights; got K=24"),
        (2, 64, torch.float16, r"weight must be \[N, 64\] of torch.bfloat16 or"),
    ],
)
def test_inputs_outside_the_kernels_limits_are_refused(m, k, wdtype, pattern):
    x = torch.zeros(m, k, dtype=torch.bfloat16)
    w = torch.zeros(16, k).to(wdtype)
    with pytest.raises(ValueError, match=pattern):
        gemv_ops.dense_gemv(x, w)


def test_scale_bias_and_device_are_checked():
    x, w = torch.zeros(2, 64, dtype=torch.bfloat16), torch.zeros(16, 64).to(FP8_DTYPE)
    with pytest.raises(ValueError, match="scale must be contiguous float32 with 16 values"):
        gemv_ops.dense_gemv(x, w, torch.ones(16, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="bias must be contiguous torch.bfloat16 with 16"):
        gemv_ops.dense_gemv(x, w, torch.ones(16), torch.ones(15, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"warps must be one of \(0, 8, 16\); got 4"):
        gemv_ops.dense_gemv(x, w, torch.ones(16), warps=4)
    with pytest.raises(ValueError, match="needs the CUDA kernels and CUDA tensors; got cpu"):
        gemv_ops.dense_gemv(x, w, torch.ones(16))


def test_shape_and_input_checks():
    assert gemv_ops.gemv_shape_ok(torch.zeros(3, 16).to(FP8_DTYPE), torch.bfloat16)
    assert not gemv_ops.gemv_shape_ok(torch.zeros(3, 24).to(FP8_DTYPE), torch.bfloat16)
    assert gemv_ops.gemv_shape_ok(torch.zeros(3, 24, dtype=torch.half), torch.half)
    assert not gemv_ops.gemv_shape_ok(torch.zeros(3, 24, dtype=torch.half), torch.bfloat16)
    assert gemv_ops.gemv_shape_ok(torch.zeros(3, 64, dtype=torch.half)[:, :24], torch.half)
    assert not gemv_ops.gemv_shape_ok(torch.zeros(3, 28, dtype=torch.half)[:, :24], torch.half)
    assert not gemv_ops.gemv_shape_ok(torch.zeros(3, 24), torch.float32)
    assert gemv_ops.gemv_input_ok(torch.zeros(8, 16, dtype=torch.half))
    assert not gemv_ops.gemv_input_ok(torch.zeros(9, 16, dtype=torch.half))
    assert not gemv_ops.gemv_input_ok(torch.zeros(0, 16, dtype=torch.half))
    assert not gemv_ops.gemv_input_ok(torch.zeros(16, 4, dtype=torch.half).t())


def test_layer_k_rule(monkeypatch):
    monkeypatch.setattr(gemv_ops, "gemv_enabled", lambda device, dtype, fp8: True)
    assert dense_gemv_linear.gemv_dtype("cuda", torch.bfloat16, 24, fp8=False) is torch.bfloat16
    assert dense_gemv_linear.gemv_dtype("cuda", torch.bfloat16, 12, fp8=False) is None
    assert dense_gemv_linear.gemv_dtype("cuda", torch.bfloat16, 24, fp8=True) is None
    assert dense_gemv_linear.gemv_dtype("cuda", torch.bfloat16, 32, fp8=True) is torch.bfloat16


@pytest.mark.parametrize("fp8", [False, True])
def test_cpu_layers_never_take_the_kernel(monkeypatch, fp8):
    monkeypatch.setattr(_dispatch, "settings", _dispatch.KernelSettings(False, "auto", True))
    g = torch.Generator().manual_seed(3)
    layer = ReplicatedLinear(64, 48, bias=True, dtype=torch.bfloat16,
                             quant_method=Fp8LinearMethod() if fp8 else None)  # fmt: skip
    layer.weight.data.copy_(torch.randn(48, 64, generator=g))
    layer.bias.data.copy_(torch.randn(48, generator=g))
    process_weights_after_loading(layer)
    assert layer.gemv_dtype is None
    x = torch.randn(2, 64, generator=g).to(torch.bfloat16)
    out = layer(x)
    if fp8:
        x_q, x_scale = quantize_rows(x)
        w = layer.weight
        ref = fp8_matmul_reference(x_q, x_scale, w, layer.weight_scale, torch.float32)
        assert torch.allclose(out.float(), ref + layer.bias.float(), rtol=2e-2, atol=2e-2)
    else:
        assert torch.equal(out, F.linear(x, layer.weight, layer.bias))
