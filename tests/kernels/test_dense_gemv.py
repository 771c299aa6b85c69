"""The skinny dense GEMM kernel (ops/dense_gemv.py) against its float32 reference at M = 1..8:
16-bit and FP8 e4m3 weights, fp16 and bf16 activations, odd N and K (K a multiple of 8, 16 for
fp8), with and without scale and bias, strided x and out, poisoned outputs; every e4m3 code
widened exactly; the linear layers' decode path (M <= 8 takes the kernel, M > 8 does not), also
under CUDA graph capture.

Error: ‖out − ref‖ / ‖ref‖ < 1e-3 with fp16 output; with bf16 the output rounding alone is
~2e-3, so the kernel is held to 1e-3 against the oracle rounded to bf16 (plus the usual bf16
bound against the fp32 oracle)."""

from __future__ import annotations

import pytest
import torch

from kestrel.layers import ReplicatedLinear, process_weights_after_loading
from kestrel.layers.fp8 import Fp8LinearMethod
from kestrel.ops import _dispatch
from kestrel.ops import dense_gemv as gemv_ops
from tests.kernels.helpers import DTYPES, TOLERANCE, rel_err, set_kernel_env

pytestmark = pytest.mark.cuda

FP8 = torch.float8_e4m3fn


@pytest.fixture(autouse=True)
def _allow_unverified(monkeypatch):
    """The dense GEMV is off by default until a GPU run verifies it (_dispatch.UNVERIFIED_OPS):
    these tests are that run."""
    set_kernel_env(monkeypatch, _dispatch.UNVERIFIED_ENV, "1")


def _check(out: torch.Tensor, ref32: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert out.dtype == dtype and out.shape == ref32.shape, what
    if dtype == torch.float16:
        err = rel_err(out, ref32)
        assert err < 1e-3, f"{what}: relative error {err:.3g}"
    else:
        err = rel_err(out, ref32.to(dtype))
        assert err < 1e-3, f"{what}: relative error {err:.3g} against the rounded oracle"
        assert rel_err(out, ref32) < TOLERANCE[dtype], what


def _weights(n: int, k: int, dtype: torch.dtype, fp8: bool, gen: torch.Generator):
    """(weight [n, k] in dtype or e4m3, scale [n] fp32 or None)."""
    w = torch.randn(n, k, generator=gen, device="cuda") * 0.05
    if not fp8:
        return w.to(dtype), None
    # Per-row scales as quantize_rows makes them, without its torch.empty (poisoned here).
    scale = w.abs().amax(dim=1) / 448.0
    return (w / scale[:, None]).to(FP8), scale.contiguous()


def _ref32(x, weight, scale, bias) -> torch.Tensor:
    """The float32 oracle before its final rounding (dense_gemv_reference rounds to x's dtype)."""
    w = weight.float() * (1.0 if scale is None else scale.reshape(-1, 1))
    return x.float() @ w.t() + (0.0 if bias is None else bias.float())


# (N, K): one tile row and one chunk, odd sizes, K not a multiple of a warp step (32 / 64), and
# Qwen2.5 shapes (0.5B o_proj, 7B qkv / down); N >= 8448 takes the 8-warp blocks (fewer rows:
# 16 warps per block, dense_gemv.cuh kWideBelowRows).
SHAPES = [(1, 16), (7, 48), (129, 208), (1001, 1040), (896, 896), (4608, 3584), (3584, 18944),
          (8459, 208)]  # fmt: skip


@pytest.mark.parametrize("fp8", [False, True], ids=["w16", "fp8"])
@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_1_to_8_against_the_reference(fp8, n, k, dtype, gen, spy, poison):
    weight, scale = _weights(n, k, dtype, fp8, gen)
    bias = torch.randn(n, generator=gen, device="cuda").to(dtype)
    for m in range(1, gemv_ops.MAX_ROWS + 1):
        x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
        use_bias = bias if m % 2 else None
        out = gemv_ops.dense_gemv(x, weight, scale, use_bias)
        what = f"{'fp8' if fp8 else 'w16'} M={m} N={n} K={k} bias={use_bias is not None}"
        _check(out, _ref32(x, weight, scale, use_bias), dtype, what)
        ref = gemv_ops.dense_gemv_reference(x, weight, scale, use_bias)
        assert rel_err(out, ref) < TOLERANCE[dtype], what
    assert spy.calls["dense_gemv"] == gemv_ops.MAX_ROWS


@pytest.mark.parametrize("fp8", [False, True], ids=["w16", "fp8"])
@pytest.mark.parametrize("warps", [8, 16])
def test_both_block_sizes_and_fp8_conversions(fp8, warps, gen, spy, poison):
    """Blocks of 8 or 16 warps (the kernel picks by N; forced here on both sides of 8448), and
    for fp8 both ways of widening the codes."""
    widens = (0, 1) if fp8 else (0,)
    for n, k in ((129, 208), (8459, 1040)):
        weight, scale = _weights(n, k, torch.bfloat16, fp8, gen)
        for fp8_widen in widens:
            x = torch.randn(5, k, generator=gen, device="cuda").to(torch.bfloat16)
            out = gemv_ops.dense_gemv(x, weight, scale, warps=warps, fp8_widen=fp8_widen)
            what = f"warps={warps} N={n} fp8_widen={fp8_widen}"
            _check(out, _ref32(x, weight, scale, None), torch.bfloat16, what)
    assert spy.calls["dense_gemv"] == 2 * len(widens)


@pytest.mark.parametrize("dtype", DTYPES)
def test_16_bit_weight_with_a_scale(dtype, gen, spy):
    weight, _ = _weights(37, 72, dtype, False, gen)
    scale = torch.rand(37, generator=gen, device="cuda") + 0.5
    x = torch.randn(5, 72, generator=gen, device="cuda").to(dtype)
    _check(gemv_ops.dense_gemv(x, weight, scale), _ref32(x, weight, scale, None), dtype, "scale")
    assert spy.calls["dense_gemv"] == 1


@pytest.mark.parametrize("fp8_widen", [0, 1], ids=["bits", "cvt"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_e4m3_code_is_widened_exactly(dtype, fp8_widen, spy):
    codes = torch.arange(256, dtype=torch.int32)
    codes[(codes & 0x7F) == 0x7F] = 0  # the two NaN codes
    # Row n is code n in every column; x = e_0 picks column 0, so out[0, n] is the code's value.
    weight = codes.to(torch.uint8).view(FP8)[:, None].expand(256, 32).contiguous().cuda()
    x = torch.zeros(1, 32, dtype=dtype, device="cuda")
    x[0, 0] = 1.0
    out = gemv_ops.dense_gemv(x, weight, fp8_widen=fp8_widen)
    expected = weight[:, 0].to(dtype)[None]  # e4m3 values are exact in fp16 and bf16
    assert torch.equal(out, expected), (out - expected).abs().max()
    # A sum of every code (x all ones, 32 columns of code n): exact in fp32 too.
    ones = torch.ones(1, 32, dtype=dtype, device="cuda")
    total = gemv_ops.dense_gemv(ones, weight, fp8_widen=fp8_widen)
    assert torch.equal(total, (32 * weight[:, :1].float().t()).to(dtype))
    assert spy.calls["dense_gemv"] == 2


@pytest.mark.parametrize("fp8", [False, True], ids=["w16", "fp8"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_x_into_strided_out_columns(fp8, dtype, gen, spy):
    n, k = 45, 96
    weight, scale = _weights(n, k, dtype, fp8, gen)
    wide_x = torch.randn(3, k + 64, generator=gen, device="cuda").to(dtype)
    x = wide_x[:, 32 : 32 + k]  # row stride k + 64, a 64-byte offset
    wide_out = torch.full((3, 100), float("nan"), device="cuda", dtype=dtype)
    cols = wide_out[:, 40 : 40 + n]
    gemv_ops.dense_gemv(x, weight, scale, out=cols)
    _check(cols, _ref32(x, weight, scale, None), dtype, "strided")
    assert wide_out[:, :40].isnan().all() and wide_out[:, 40 + n :].isnan().all()
    # x with 9+ rows, a K the kernel cannot take, a misaligned x: ValueErrors naming the value
    with pytest.raises(ValueError, match=r"M \(rows of x\) must be in \[1, 8\]; got 9"):
        gemv_ops.dense_gemv(torch.zeros(9, k, dtype=dtype, device="cuda"), weight, scale)
    flat = torch.zeros(k + 1, dtype=dtype, device="cuda")
    with pytest.raises(ValueError, match="16-byte alignment"):
        gemv_ops.dense_gemv(flat[1:].view(1, k), weight, scale)
    assert spy.calls["dense_gemv"] == 1


# ---- the linear layers ------------------------------------------------------------------


def _layer(method, n, k, bias, dtype, gen):
    layer = ReplicatedLinear(k, n, bias=bias, dtype=dtype, device="cuda", quant_method=method)
    layer.weight.data.copy_(torch.randn(n, k, generator=gen, device="cuda") * 0.05)
    if bias:
        layer.bias.data.copy_(torch.randn(n, generator=gen, device="cuda"))
    process_weights_after_loading(layer)
    return layer


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_decode_rows_take_the_kernel(fp8, bias, gen, spy):
    dtype, n, k = torch.bfloat16, 1040, 576
    layer = _layer(Fp8LinearMethod() if fp8 else None, n, k, bias, dtype, gen)
    assert layer.gemv_dtype == dtype
    scale = layer.weight_scale.reshape(-1) if fp8 else None
    for m in (1, 3, 8, 9, 33):
        x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
        before = spy.calls["dense_gemv"]
        out = layer(x)
        assert spy.calls["dense_gemv"] == before + (m <= gemv_ops.MAX_ROWS), f"M={m}"
        ref = _ref32(x, layer.weight, scale, layer.bias)
        # M > 8 with fp8 quantizes the activations too: only the W8A8 bound applies there.
        bound = 0.06 if fp8 and m > gemv_ops.MAX_ROWS else TOLERANCE[dtype]
        assert rel_err(out, ref) < bound, f"M={m}"


def test_defaults_bf16_gemv_off_fp8_gemv_on(monkeypatch, gen, spy):
    """dense_gemv_bf16 is in UNVERIFIED_OPS (no engine gain measured); dense_gemv_fp8 is not."""
    set_kernel_env(monkeypatch, _dispatch.UNVERIFIED_ENV, None)
    layer = _layer(None, 64, 64, False, torch.bfloat16, gen)
    assert layer.gemv_dtype is None
    layer(torch.randn(2, 64, generator=gen, device="cuda").to(torch.bfloat16))
    assert spy.calls["dense_gemv"] == 0
    layer = _layer(Fp8LinearMethod(), 64, 64, False, torch.bfloat16, gen)
    assert layer.gemv_dtype is not None
    layer(torch.randn(2, 64, generator=gen, device="cuda").to(torch.bfloat16))
    assert spy.calls["dense_gemv"] == 1


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_linear_decode_rows_under_cuda_graph_capture(fp8, gen, spy):
    dtype, n, k, m = torch.bfloat16, 528, 256, 4  # FP8 layers need N % 16 == 0 on CUDA
    layer = _layer(Fp8LinearMethod() if fp8 else None, n, k, True, dtype, gen)
    static_x = torch.zeros(m, k, dtype=dtype, device="cuda")
    layer(static_x)  # warm-up outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = layer(static_x)
    scale = layer.weight_scale.reshape(-1) if fp8 else None
    for _ in range(2):
        static_x.copy_(torch.randn(m, k, generator=gen, device="cuda").to(dtype))
        graph.replay()
        ref = _ref32(static_x, layer.weight, scale, layer.bias)
        assert rel_err(static_out, ref) < TOLERANCE[dtype]
    assert spy.calls["dense_gemv"] == 2  # the warm-up and the capture; replays launch no Python
