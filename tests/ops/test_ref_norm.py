"""rms_norm / fused_add_rms_norm against transformers' LlamaRMSNorm."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from kestrel.ops import fused_add_rms_norm, rms_norm


def _hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    module = LlamaRMSNorm(weight.shape[0], eps=eps).to(weight.dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
        return module(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens,hidden", [(1, 64), (7, 96), (33, 200)])
def test_rms_norm_matches_transformers(dtype, num_tokens, hidden):
    gen = torch.Generator().manual_seed(num_tokens * 1000 + hidden)
    x = (torch.randn(num_tokens, hidden, generator=gen) * 3 + 0.5).to(dtype)
    weight = (torch.rand(hidden, generator=gen) + 0.5).to(dtype)
    x_before = x.clone()
    got = rms_norm(x, weight, 1e-6)
    want = _hf_rms_norm(x, weight, 1e-6)
    assert got.dtype == dtype and got.shape == x.shape
    # Same operations in the same order as transformers on the same device: bit-identical.
    assert torch.equal(got, want)
    assert torch.equal(x, x_before), "rms_norm must not modify its input"


def test_rms_norm_against_naive_loop():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(5, 24, generator=gen, dtype=torch.float64).float()
    weight = torch.randn(24, generator=gen)
    eps = 1e-5
    got = rms_norm(x, weight, eps)
    for t in range(5):
        row = x[t].double()
        denom = (sum(float(v) ** 2 for v in row) / 24 + eps) ** 0.5
        want = (row / denom * weight.double()).float()
        torch.testing.assert_close(got[t], want, atol=1e-6, rtol=1e-5)


def test_rms_norm_eps_matters():
    x = torch.full((2, 8), 1e-3)
    weight = torch.ones(8)
    # mean(x^2) = 1e-6: with eps 1e-6 the result is x / sqrt(2e-6), not ~1.
    got = rms_norm(x, weight, 1e-6)
    torch.testing.assert_close(got, torch.full((2, 8), 1e-3 / (2e-6) ** 0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_add_rms_norm_in_place(dtype):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(9, 80, generator=gen).to(dtype)
    residual = torch.randn(9, 80, generator=gen).to(dtype)
    weight = (torch.rand(80, generator=gen) + 0.5).to(dtype)
    want_residual = x + residual  # in residual's dtype
    want_x = _hf_rms_norm(want_residual, weight, 1e-5)
    x_ptr, residual_ptr = x.data_ptr(), residual.data_ptr()
    assert fused_add_rms_norm(x, residual, weight, 1e-5) is None
    assert x.data_ptr() == x_ptr and residual.data_ptr() == residual_ptr
    assert torch.equal(residual, want_residual)
    assert torch.equal(x, want_x)


def test_norm_errors_name_bad_shapes():
    with pytest.raises(ValueError, match=r"weight \(12,\)"):
        rms_norm(torch.randn(3, 8), torch.randn(12), 1e-6)
    with pytest.raises(ValueError, match="eps"):
        rms_norm(torch.randn(3, 8), torch.randn(8), 0.0)
    with pytest.raises(ValueError, match="same shape and dtype"):
        fused_add_rms_norm(torch.randn(3, 8), torch.randn(4, 8), torch.randn(8), 1e-6)
    with pytest.raises(ValueError, match="same shape and dtype"):
        fused_add_rms_norm(
            torch.randn(3, 8), torch.randn(3, 8, dtype=torch.bfloat16), torch.randn(8), 1e-6
        )
