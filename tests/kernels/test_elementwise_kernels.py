"""RMSNorm, fused add + RMSNorm and SiLU-and-mul kernels against fp32 torch oracles."""

import pytest
import torch

from kestrel.ops import (
    fused_add_rms_norm,
    fused_add_rms_norm_reference,
    rms_norm,
    rms_norm_reference,
    silu_and_mul,
    silu_and_mul_reference,
)
from tests.kernels.helpers import DTYPES, TOLERANCE, assert_close, randn, rel_err, set_kernel_env

pytestmark = pytest.mark.cuda

# 769: odd (scalar path); 128: warp-per-row; 5120, 4096: 256 threads; 16384: 1024 threads.
HIDDEN = [769, 128, 4096, 5120, 16384]
ROWS = [1, 7, 300]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
def test_rms_norm(dtype, hidden, rows, gen, spy, poison):
    x = randn(rows, hidden, dtype=dtype, gen=gen) * 3
    weight = randn(hidden, dtype=dtype, gen=gen)
    x_before = x.clone()
    out = rms_norm(x, weight, 1e-5)
    assert spy.calls["rms_norm"] == 1
    assert out.dtype == dtype and out.is_contiguous()
    assert torch.equal(x, x_before)  # input untouched
    assert_close(out, rms_norm_reference(x.float(), weight.float(), 1e-5), dtype, "rms_norm")
    # Same-dtype reference: only the fp32 sum order differs, so rounding flips are rare.
    assert rel_err(out, rms_norm_reference(x, weight, 1e-5)) < TOLERANCE[dtype] / 4


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_per_head_view(dtype, gen, spy, poison):
    """q/k norm of Qwen3: [T, H, D] views into a fused qkv buffer (token stride > H * D)."""
    tokens, heads, head_dim = 37, 5, 128
    qkv = randn(tokens, (heads + 3) * head_dim, dtype=dtype, gen=gen)
    q = qkv[:, head_dim : (heads + 1) * head_dim].view(tokens, heads, head_dim)
    weight = randn(head_dim, dtype=dtype, gen=gen)
    out = rms_norm(q, weight, 1e-6)
    assert spy.calls["rms_norm"] == 1 and out.shape == q.shape
    assert_close(out, rms_norm_reference(q.float(), weight.float(), 1e-6), dtype, "per-head")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
def test_fused_add_rms_norm(dtype, hidden, rows, gen, spy):
    x = randn(rows, hidden, dtype=dtype, gen=gen)
    residual = randn(rows, hidden, dtype=dtype, gen=gen) * 2
    weight = randn(hidden, dtype=dtype, gen=gen)
    x_ref, res_ref = x.float(), residual.float()
    expected_sum = (x.float() + residual.float()).to(dtype)  # one rounding, as torch's add_
    fused_add_rms_norm_reference(x_ref, res_ref, weight.float(), 1e-6)
    fused_add_rms_norm(x, residual, weight, 1e-6)
    assert spy.calls["fused_add_rms_norm"] == 1
    assert torch.equal(residual, expected_sum)
    assert_close(x, x_ref, dtype, "fused_add_rms_norm")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [769, 5120, 14336])
@pytest.mark.parametrize("tokens", [1, 5, 300])
def test_silu_and_mul(dtype, inter, tokens, gen, spy, poison):
    x = randn(tokens, 2 * inter, dtype=dtype, gen=gen) * 4
    out = silu_and_mul(x)
    assert spy.calls["silu_and_mul"] == 1 and out.shape == (tokens, inter)
    assert_close(out, silu_and_mul_reference(x.float()), dtype, "silu_and_mul")
    assert rel_err(out, silu_and_mul_reference(x)) < TOLERANCE[dtype] / 4


def test_reference_used_when_disabled(gen, spy, monkeypatch):
    set_kernel_env(monkeypatch, "KESTREL_DISABLE_KERNELS", "1")
    x = randn(4, 64, dtype=torch.bfloat16, gen=gen)
    out = silu_and_mul(x)
    assert sum(spy.calls.values()) == 0
    assert torch.equal(out, silu_and_mul_reference(x))


def test_fp32_takes_the_reference(gen, spy):
    x = randn(4, 64, dtype=torch.float32, gen=gen)
    w = randn(64, dtype=torch.float32, gen=gen)
    assert torch.equal(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))
    assert sum(spy.calls.values()) == 0


def test_device_mismatch_is_rejected(gen):
    x = randn(4, 64, dtype=torch.bfloat16, gen=gen)
    with pytest.raises(ValueError, match="one device"):
        rms_norm(x, torch.ones(64, dtype=torch.bfloat16), 1e-6)
