"""GGUF quant kernels (fused dequantize-GEMV for M <= 8, dequantize + cuBLAS for prefill)
against the `gguf` package's dequantization followed by a float32 matmul.

Weights: Q8_0 / Q4_0 blocks quantized by `gguf`, K-quant blocks random and valid; odd N and K
(multiples of the block size). Error: ‖out − ref‖ / ‖ref‖ < 1e-3 with fp16 activations and
output; with bf16 the output rounding alone is ~2e-3, so the kernel is held to 1e-3 against the
oracle rounded to bf16 (plus the usual bf16 bound against the fp32 oracle)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from kestrel.layers import QKVParallelLinear, ReplicatedLinear, gguf_linear
from kestrel.layers.gguf_linear import GGUFLinearMethod
from kestrel.ops import _dispatch
from kestrel.ops import gguf as gguf_ops
from kestrel.testing.gguf_blocks import random_blocks
from tests.kernels.helpers import DTYPES, TOLERANCE, rel_err, set_kernel_env

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def _allow_unverified(monkeypatch):
    """The GGUF kernels are off by default until a GPU run verifies them
    (_dispatch.UNVERIFIED_OPS): these tests are that run."""
    set_kernel_env(monkeypatch, _dispatch.UNVERIFIED_ENV, "1")


TYPES = [Q.Q8_0, Q.Q4_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]
# (N, blocks per row): one row and one block, odd sizes, a 7B-like row (Q4_K: K = 3584), and
# rows of many blocks (v2: 8 warps per CTA, several chunks per warp, a partial last chunk).
SHAPES = [(1, 1), (7, 3), (129, 5), (1001, 14), (17, 37), (33, 130)]
VARIANTS = list(gguf_ops.GEMV_VARIANTS)


@pytest.fixture(params=VARIANTS)
def variant(request, monkeypatch) -> str:
    """Each GEMV test runs once per kernel (KESTREL_GGUF_GEMV, read by the launcher per call)."""
    monkeypatch.setenv(gguf_ops.GEMV_VARIANT_ENV, request.param)
    return request.param


def _weights(qtype: Q, n: int, blocks: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw blocks on the GPU, the fp32 dequantized oracle W [n, k] on the GPU)."""
    k = gguf_ops.block_size(qtype)[0] * blocks
    raw = random_blocks(qtype, n, k, np.random.default_rng(seed))
    dense = torch.from_numpy(dequantize(raw, qtype))
    return torch.from_numpy(raw).cuda(), dense.cuda()


def _check(out: torch.Tensor, x: torch.Tensor, dense: torch.Tensor, what: str) -> None:
    ref = x.float() @ dense.T  # [M, N] fp32 oracle
    assert out.dtype == x.dtype and out.shape == ref.shape, what
    if x.dtype == torch.float16:
        err = rel_err(out, ref)
        assert err < 1e-3, f"{what}: relative error {err:.3g}"
    else:
        err = rel_err(out, ref.to(x.dtype))
        assert err < 1e-3, f"{what}: relative error {err:.3g} against the rounded oracle"
        assert rel_err(out, ref) < TOLERANCE[x.dtype], what


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n, blocks", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_decode_rows(qtype, n, blocks, dtype, variant, gen, spy, poison):
    raw, dense = _weights(qtype, n, blocks, seed=int(qtype) * 1000 + n)
    for m in range(1, gguf_ops.MAX_GEMV_ROWS + 1):
        x = torch.randn(m, dense.shape[1], generator=gen, device="cuda").to(dtype)
        out = gguf_ops.gguf_gemv(x, raw, qtype)
        _check(out, x, dense, f"{variant} {qtype.name} M={m} N={n} K={dense.shape[1]}")
    assert spy.calls["gguf_gemv"] == gguf_ops.MAX_GEMV_ROWS


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mma_variant", ["v2"])
def test_gemv_many_rows_takes_the_light_kernel(
    qtype, dtype, mma_variant, gen, spy, poison, monkeypatch
):
    """N > 2 * 16 * SMs rows (v2's second kernel: chunks of half as many blocks, 7 warps), odd N
    so the last 16-row tile is partial; 9 blocks per row leave a partial chunk."""
    monkeypatch.setenv(gguf_ops.GEMV_VARIANT_ENV, mma_variant)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    n = 2 * 16 * sms + 37
    raw, dense = _weights(qtype, n, 9, seed=int(qtype) + 77)
    for m in (1, 3, 8):
        x = torch.randn(m, dense.shape[1], generator=gen, device="cuda").to(dtype)
        out = gguf_ops.gguf_gemv(x, raw, qtype)
        _check(out, x, dense, f"{mma_variant} light {qtype.name} M={m} N={n}")  # a bad tile: ~5e-2
    assert spy.calls["gguf_gemv"] == 3


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_into_strided_columns_and_strided_x(qtype, dtype, variant, gen, spy):
    raw, dense = _weights(qtype, 37, 2, seed=7)
    k = dense.shape[1]
    wide_x = torch.randn(3, k + 64, generator=gen, device="cuda").to(dtype)
    x = wide_x[:, 32 : 32 + k]  # row stride k + 64, 64-byte offset
    wide_out = torch.full((3, 100), float("nan"), device="cuda", dtype=dtype)
    cols = wide_out[:, 40:77]
    gguf_ops.gguf_gemv(x, raw, qtype, out=cols)
    _check(cols, x, dense, f"{variant} {qtype.name} strided")
    assert torch.isnan(wide_out[:, :40]).all() and torch.isnan(wide_out[:, 77:]).all()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_kernel_matches_gguf(qtype, dtype, spy, poison):
    raw, dense = _weights(qtype, 129, 5, seed=11)
    out = gguf_ops.gguf_dequantize(raw, qtype, dtype)
    assert spy.calls["gguf_dequantize"] == 1 and out.dtype == dtype
    want = dense.to(dtype)
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11  # the same fp32 value, rounded once
    torch.testing.assert_close(out.float(), want.float(), rtol=ulp, atol=1e-7)
    assert (out == want).float().mean() > 0.999


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [17, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_prefill_dequantizes_then_matmul(qtype, m, dtype, gen, spy):
    raw, dense = _weights(qtype, 301, 3, seed=13)
    k = dense.shape[1]
    layer = ReplicatedLinear(
        k, 301, bias=False, dtype=dtype, device="cuda", quant_method=GGUFLinearMethod([qtype])
    )
    layer.weight.weight_loader(layer.weight, raw.cpu())
    x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
    out = layer(x)
    assert spy.calls["gguf_dequantize"] == 1 and spy.calls["gguf_gemv"] == 0
    ref = x.float() @ dense.T
    limit = 1e-3 if dtype == torch.float16 else TOLERANCE[dtype]  # bf16: weights rounded too
    assert rel_err(out, ref) < limit


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 5, 17])
def test_qkv_layer_with_mixed_types_and_bias(dtype, m, gen, spy, poison):
    hidden, head_dim, heads, kv_heads = 512, 64, 4, 2
    types = [Q.Q4_K, Q.Q4_K, Q.Q6_K]
    layer = QKVParallelLinear(
        hidden, head_dim, heads, kv_heads, bias=True, dtype=dtype, device="cuda",
        quant_method=GGUFLinearMethod(types), prefix="qkv",
    )  # fmt: skip
    rows = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    dense = []
    for i, (shard, qtype, r) in enumerate(zip("qkv", types, rows)):
        raw, w = _weights(qtype, r, hidden // 256, seed=100 + i)
        layer.weight.weight_loader(layer.weight, raw.cpu(), shard)
        dense.append(w)
    bias = torch.randn(sum(rows), generator=gen, device="cuda").to(dtype)
    for shard, part in zip("qkv", bias.split(rows)):
        layer.bias.weight_loader(layer.bias, part, shard)
    x = torch.randn(m, hidden, generator=gen, device="cuda").to(dtype)
    out = layer(x)
    launches = spy.calls["gguf_gemv"] if m <= 8 else spy.calls["gguf_dequantize"]
    assert launches == 2  # one per segment: q+k (Q4_K) and v (Q6_K)
    ref = x.float() @ torch.cat(dense).T + bias.float()
    limit = 2e-3 if dtype == torch.float16 else TOLERANCE[dtype]
    assert rel_err(out, ref) < limit


def test_gemv_under_cuda_graph_capture(variant, gen):
    raw, dense = _weights(Q.Q4_K, 64, 2, seed=5)
    layer_x = torch.zeros(1, 512, device="cuda", dtype=torch.bfloat16)
    out = gguf_ops.gguf_gemv(layer_x, raw, Q.Q4_K)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gguf_ops.gguf_gemv(layer_x, raw, Q.Q4_K)
    layer_x.copy_(torch.randn(1, 512, generator=gen, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    _check(out, layer_x, dense, f"{variant} graph replay")


def test_gemv_variant_must_be_known(monkeypatch):
    raw, _ = _weights(Q.Q8_0, 4, 2, seed=1)
    x = torch.zeros(1, 64, device="cuda", dtype=torch.float16)
    monkeypatch.setenv(gguf_ops.GEMV_VARIANT_ENV, "v4")
    with pytest.raises(ValueError, match=r"KESTREL_GGUF_GEMV='v4' is not one of v1, v2"):
        gguf_ops.gguf_gemv(x, raw, Q.Q8_0)
    out = torch.empty(1, 4, device="cuda", dtype=torch.float16)
    args = _dispatch.kernel_args(
        _dispatch.kernels.GgufGemvArgs, out=out.data_ptr(), ldo=4, x=x.data_ptr(), ldx=64,
        weight=raw.data_ptr(), row_bytes=68, m=1, n=4, k=64, ggml_type=int(Q.Q8_0), dtype=0,
    )  # fmt: skip
    assert _dispatch.kernels.gguf_gemv(args, 0) != 0  # the launcher refuses it as well
    monkeypatch.setenv(gguf_ops.GEMV_VARIANT_ENV, "")  # empty: the default kernel
    assert _dispatch.kernels.gguf_gemv(args, 0) == 0


def test_bad_arguments_are_refused():
    raw, _ = _weights(Q.Q8_0, 4, 2, seed=1)
    x9 = torch.zeros(9, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match=r"1 <= M <= 8"):
        gguf_ops.gguf_gemv(x9, raw, Q.Q8_0)
    with pytest.raises(ValueError, match=r"fp16/bf16 \[M, 64\]"):
        gguf_ops.gguf_gemv(torch.zeros(1, 96, device="cuda", dtype=torch.float16), raw, Q.Q8_0)
    flat = torch.zeros(4 * 68 + 2, device="cuda", dtype=torch.uint8)
    with pytest.raises(ValueError, match="16-byte aligned"):
        gguf_ops.gguf_gemv(x9[:1], flat[2:].view(4, 68), Q.Q8_0)
    kernels = _dispatch.kernels
    args = _dispatch.kernel_args(
        kernels.GgufGemvArgs, out=x9.data_ptr(), ldo=4, x=x9.data_ptr(), ldx=64,
        weight=raw.data_ptr(), row_bytes=68, m=9, n=4, k=64, ggml_type=int(Q.Q8_0), dtype=0,
    )  # fmt: skip
    assert kernels.gguf_gemv(args, 0) != 0  # M = 9: the launcher refuses
    args.m, args.ggml_type = 1, int(Q.Q4_1)
    assert kernels.gguf_gemv(args, 0) != 0  # no kernel for Q4_1
    args.ggml_type, args.row_bytes = int(Q.Q8_0), 70
    assert kernels.gguf_gemv(args, 0) != 0  # row_bytes that is not K / 32 blocks


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_in_chunks_of_eight_rows(dtype, variant, gen, spy, poison, monkeypatch):
    monkeypatch.setattr(gguf_linear, "GEMV_ROW_LIMIT", 32)  # batched decode through the GEMV
    raw, dense = _weights(Q.Q4_K, 77, 2, seed=21)
    layer = ReplicatedLinear(
        512, 77, bias=False, dtype=dtype, device="cuda", quant_method=GGUFLinearMethod([Q.Q4_K])
    )
    layer.weight.weight_loader(layer.weight, raw.cpu())
    x = torch.randn(20, 512, generator=gen, device="cuda").to(dtype)
    out = layer(x)
    assert spy.calls["gguf_gemv"] == 3 and spy.calls["gguf_dequantize"] == 0  # rows 8 + 8 + 4
    _check(out, x, dense, "chunked GEMV")
