"""FP8 linear layers on CPU: the quantization math against its error bound, torch._scaled_mm
against a float32 matmul of the dequantized operands, the FP8 layer against the unquantized
one, the loading of FP8 checkpoint tensors (per-channel and per-tensor scales, fused and
tensor-parallel layers) and the device check."""

from __future__ import annotations

import pytest
import torch

from kestrel.config import ConfigError
from kestrel.layers import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    process_weights_after_loading,
)
from kestrel.layers.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    MIN_SCALE,
    Fp8LinearMethod,
    dequantize_rows,
    fp8_matmul,
    fp8_matmul_reference,
    quantize_rows,
    require_fp8_device,
)
from tests.layers.tp_sim import split_group

# e4m3 keeps 3 mantissa bits: rounding a normal value moves it by at most 2^-4 of itself;
# below 2^-6 (subnormals) the step is 2^-9, so the error is at most 2^-10 (times the scale).
REL_STEP, SUBNORMAL_STEP = 2.0**-4, 2.0**-10
# Gaussian weights and activations, K = 256: measured 0.037 for a whole FP8 linear.
LINEAR_REL_TOL = 0.06


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def _rows_of_every_magnitude() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 96, generator=g)
    x[1] *= 1e-4
    x[2] *= 3e3
    x[3] = 0.0  # an all-zero row: scale MIN_SCALE, no division by zero
    x[4, 7] = 50.0  # one outlier: the rest of the row goes to small and subnormal codes
    x[5] = torch.logspace(-6, 2, 96) * torch.sign(torch.randn(96, generator=g))
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_dequantize_round_trip_is_within_half_a_step(dtype):
    x = _rows_of_every_magnitude().to(dtype)
    q, scale = quantize_rows(x)
    assert q.dtype == FP8_DTYPE and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (x.shape[0], 1)
    back = dequantize_rows(q, scale)
    xf = x.float()
    bound = REL_STEP * xf.abs() + SUBNORMAL_STEP * scale + 1e-12
    assert torch.all((back - xf).abs() <= bound), (back - xf).abs().max()
    # Each row's largest |value| lands on +-448 exactly; the zero row stays zero.
    amax = q.float().abs().amax(dim=-1)
    assert torch.equal(amax[[0, 1, 2, 4, 5]], torch.full((5,), FP8_MAX))
    assert scale[3].item() == pytest.approx(MIN_SCALE) and torch.all(q[3].float() == 0)
    assert torch.isfinite(back).all()


def test_rows_of_tiny_values_keep_their_precision():
    # The scale's floor (against all-zero rows) must not coarsen small but real rows.
    x = torch.full((2, 16), 1e-30)
    x[1, 3] = 3e-31
    q, scale = quantize_rows(x)
    assert q.float().abs().max() == FP8_MAX
    back = dequantize_rows(q, scale)
    assert ((back - x).abs() / x).max() <= REL_STEP  # elementwise: squares would underflow


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("t", "k", "n"), [(1, 64, 48), (7, 96, 160), (33, 256, 80)])
def test_scaled_mm_matches_the_dequantized_float32_matmul(t, k, n, out_dtype):
    g = torch.Generator().manual_seed(t)
    x_q, x_scale = quantize_rows(torch.randn(t, k, generator=g) * 3)
    w_q, w_scale = quantize_rows(torch.randn(n, k, generator=g))
    w_scale = w_scale.reshape(1, n)
    out = fp8_matmul(x_q, x_scale, w_q, w_scale, out_dtype)
    ref = fp8_matmul_reference(x_q, x_scale, w_q, w_scale, torch.float32)
    assert out.shape == (t, n) and out.dtype == out_dtype
    tol = 1e-5 if out_dtype == torch.float32 else 8e-3  # bf16 output rounding
    assert _rel(out, ref) < tol


def _fp8_twin(make, weight: torch.Tensor, bias: torch.Tensor | None, dtype=torch.float32):
    """(unquantized layer, FP8 layer) with the same weights, quantized at load."""
    plain = make(None, dtype)
    fp8 = make(Fp8LinearMethod(), dtype)
    for layer in (plain, fp8):
        layer.weight.data.copy_(weight)
        if bias is not None:
            layer.bias.data.copy_(bias)
    process_weights_after_loading(fp8)
    return plain, fp8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_close_to_unquantized(dtype, bias):
    g = torch.Generator().manual_seed(3)
    weight, b = torch.randn(160, 256, generator=g), torch.randn(160, generator=g)
    x = torch.randn(2, 9, 256, generator=g).to(dtype)  # leading dims are flattened

    def make(method, dt):
        return ReplicatedLinear(256, 160, bias=bias, dtype=dt, quant_method=method)

    plain, fp8 = _fp8_twin(make, weight, b if bias else None, dtype)
    assert fp8.weight.dtype == FP8_DTYPE and fp8.weight.shape == (160, 256)
    assert fp8.weight_scale.dtype == torch.float32 and fp8.weight_scale.shape == (1, 160)
    out = fp8(x)
    assert out.shape == (2, 9, 160) and out.dtype == dtype
    assert _rel(out, plain(x)) < LINEAR_REL_TOL
    # Exactly what the dequantized operands give: the error is the quantization's alone.
    x_q, x_scale = quantize_rows(x.reshape(-1, 256))
    ref = fp8_matmul_reference(x_q, x_scale, fp8.weight, fp8.weight_scale, torch.float32)
    if bias:
        ref = ref + b
    assert _rel(out.reshape(-1, 160), ref) < (1e-5 if dtype == torch.float32 else 8e-3)


def test_empty_batch_and_second_processing_are_harmless():
    layer = ReplicatedLinear(64, 32, bias=False, quant_method=Fp8LinearMethod())
    layer.weight.data.normal_()
    process_weights_after_loading(layer)
    weight = layer.weight.data.clone()
    process_weights_after_loading(layer)  # a no-op, not a re-quantization of FP8 codes
    assert torch.equal(layer.weight.data.view(torch.uint8), weight.view(torch.uint8))
    assert layer(torch.empty(0, 64)).shape == (0, 32)


def _serialized(weight: torch.Tensor, strategy: str, parts: list[int]):
    """An FP8 checkpoint's tensors for `weight` [N, K] made of `parts` rows each:
    float8 weights and per-channel [N, 1] or per-part scalar scales."""
    if strategy == "channel":
        q, scale = quantize_rows(weight)
        return [(q[s : s + n], scale[s : s + n]) for s, n in _spans(parts)]
    out = []
    for s, n in _spans(parts):
        part = weight[s : s + n]
        scale = part.abs().max() / FP8_MAX
        out.append(((part / scale).to(FP8_DTYPE), scale.reshape(())))
    return out


def _spans(parts: list[int]) -> list[tuple[int, int]]:
    starts = [sum(parts[:i]) for i in range(len(parts))]
    return list(zip(starts, parts))


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
@pytest.mark.parametrize("tp", [1, 2])
def test_serialized_qkv_and_row_layers_load_their_shards(strategy, tp):
    """Checkpoint q/k/v tensors with their own scales, loaded into tp ranks: each rank's
    output is its slice of the dequantized full layer's."""
    hidden, head_dim, heads, kv_heads = 64, 16, 4, 2
    g = torch.Generator().manual_seed(5)
    parts = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    weight = torch.randn(sum(parts), hidden, generator=g) * torch.tensor([1.0, 5.0, 0.2]).repeat_interleave(torch.tensor(parts))[:, None]  # fmt: skip
    tensors = _serialized(weight, strategy, parts)
    full = torch.cat([q.float() * s.reshape(-1, 1) for q, s in tensors])  # dequantized [N, K]
    x = torch.randn(5, hidden, generator=g)
    x_q, x_scale = quantize_rows(x)
    x_deq = dequantize_rows(x_q, x_scale)
    method = Fp8LinearMethod(serialized=True, weight_scale=strategy)
    outs = []
    for rank in range(tp):
        layer = QKVParallelLinear(
            hidden, head_dim, heads, kv_heads, bias=False, quant_method=method,
            tp_group=split_group(rank, tp), prefix="attn.qkv_proj",
        )  # fmt: skip
        for shard_id, (q, s) in zip(("q", "k", "v"), tensors):
            layer.weight.weight_loader(layer.weight, q, shard_id)
            layer.weight_scale.weight_loader(layer.weight_scale, s, shard_id)
        process_weights_after_loading(layer)
        outs.append(layer(x))
    # Rank r holds q heads r*2.., then its k and v heads: compare per part.
    ref = x_deq @ full.t()
    q_ref, k_ref, v_ref = ref.split(parts, dim=-1)
    q_out = torch.cat([o[:, : parts[0] // tp] for o in outs], dim=-1)
    k_out = torch.cat([o[:, parts[0] // tp : (parts[0] + parts[1]) // tp] for o in outs], dim=-1)
    v_out = torch.cat([o[:, (parts[0] + parts[1]) // tp :] for o in outs], dim=-1)
    for got, want in ((q_out, q_ref), (k_out, k_ref), (v_out, v_ref)):
        assert _rel(got, want) < 1e-5

    # A row-parallel layer: every rank holds all N scales and its K columns.
    row_weight = torch.randn(48, 64, generator=g)
    (row_q, row_s), = _serialized(row_weight, strategy, [48])  # fmt: skip
    total = torch.zeros(5, 48)
    for rank in range(tp):
        layer = RowParallelLinear(
            64, 48, bias=False, input_is_parallel=False, quant_method=method,
            tp_group=split_group(rank, tp), prefix="mlp.down_proj",
        )  # fmt: skip
        layer.weight.weight_loader(layer.weight, row_q)
        layer.weight_scale.weight_loader(layer.weight_scale, row_s)
        process_weights_after_loading(layer)
        total += layer(x)
    row_ref = x @ (row_q.float() * row_s.reshape(-1, 1)).t()
    assert _rel(total, row_ref) < LINEAR_REL_TOL  # each rank quantizes its own slice of x


def test_serialized_merged_layer_per_tensor_scales_stay_per_part():
    layer = MergedColumnParallelLinear(
        32, [16, 16], bias=False, quant_method=Fp8LinearMethod(True, "tensor"), prefix="mlp.gu"
    )
    gate = torch.full((16, 32), 2.0).to(FP8_DTYPE)
    up = torch.full((16, 32), 2.0).to(FP8_DTYPE)
    layer.weight.weight_loader(layer.weight, gate, 0)
    layer.weight.weight_loader(layer.weight, up, 1)
    layer.weight_scale.weight_loader(layer.weight_scale, torch.tensor([0.5]), 0)
    layer.weight_scale.weight_loader(layer.weight_scale, torch.tensor(4.0), 1)
    process_weights_after_loading(layer)
    out = layer(torch.ones(1, 32))
    assert torch.allclose(out[0, :16], torch.full((16,), 32.0))  # 32 * 2 * 0.5
    assert torch.allclose(out[0, 16:], torch.full((16,), 256.0))  # 32 * 2 * 4


@pytest.mark.parametrize(
    ("param", "tensor", "shard_id", "pattern"),
    [
        ("weight", torch.zeros(16, 32, dtype=torch.bfloat16), 0, "must be float8_e4m3fn"),
        ("weight_scale", torch.ones(16, 1), 0, "one value"),
        ("weight_scale", torch.ones(1), 2, "unknown shard 2"),
        ("weight_scale", torch.ones(1), "0", "unknown shard '0'"),
    ],
)
def test_serialized_loader_errors_name_the_problem(param, tensor, shard_id, pattern):
    layer = MergedColumnParallelLinear(
        32, [16, 16], bias=False, quant_method=Fp8LinearMethod(True, "tensor"), prefix="mlp.gu"
    )
    p = getattr(layer, param)
    with pytest.raises(ValueError, match=pattern):
        p.weight_loader(p, tensor, shard_id)


def test_per_channel_scale_must_be_a_column():
    layer = ReplicatedLinear(32, 16, bias=False, quant_method=Fp8LinearMethod(True, "channel"))
    with pytest.raises(ValueError, match="block-wise"):
        layer.weight_scale.weight_loader(layer.weight_scale, torch.ones(16, 2))
    with pytest.raises(ValueError, match="shape mismatch"):
        layer.weight_scale.weight_loader(layer.weight_scale, torch.ones(15, 1))


def test_unknown_weight_scale_strategy_is_refused():
    with pytest.raises(ValueError, match="'block'.*channel, tensor"):
        Fp8LinearMethod(True, "block")


def test_cpu_is_refused_naming_the_device_and_what_is_needed():
    with pytest.raises(ConfigError, match=r"device is cpu.*") as info:
        require_fp8_device("cpu")
    assert "compute capability 8.9" in str(info.value) and info.value.field == "quantization"


def test_gpu_without_fp8_is_refused_naming_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4")
    with pytest.raises(ConfigError, match=r"NVIDIA A100-SXM4 of compute capability 8\.0"):
        require_fp8_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    require_fp8_device("cuda:0")  # Ada: accepted
