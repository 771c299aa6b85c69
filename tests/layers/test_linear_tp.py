"""Linear layers sharded over tp = 1, 2, 4 simulated ranks (CPU, fp32) vs the unsharded op.

Each rank's layer loads the same full checkpoint tensors through its weight loaders; the ranks'
outputs, combined as the collective would (column: concat, row: sum), must equal F.linear of
the full weights. At tp 1 (the real size-1 group) the layer must BE F.linear, bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kestrel.layers import (
    ColumnParallelLinear,
    LinearBase,
    LinearMethodBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
    process_weights_after_loading,
)
from tests.layers.tp_sim import SplitGroup, load_full, split_group

TP_SIZES = (1, 2, 4)
HIDDEN = 12
NUM_TOKENS = 5


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def check(actual: torch.Tensor, expected: torch.Tensor, tp: int) -> None:
    if tp == 1:
        assert torch.equal(actual, expected)
    else:
        torch.testing.assert_close(actual, expected, rtol=1.3e-6, atol=1e-5)


@pytest.mark.parametrize("tp", TP_SIZES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("gather_output", [False, True])
def test_column_parallel_concat_equals_full(tp: int, bias: bool, gather_output: bool) -> None:
    weight, x = randn(16, HIDDEN, seed=0), randn(NUM_TOKENS, HIDDEN, seed=1)
    b = randn(16, seed=2) if bias else None
    outs = []
    for rank in range(tp):
        group = split_group(rank, tp)
        layer = ColumnParallelLinear(
            HIDDEN, 16, bias=bias, gather_output=gather_output, tp_group=group, prefix="proj"
        )
        load_full(layer, {"weight": weight} | ({"bias": b} if bias else {}))
        assert layer.weight.shape == (16 // tp, HIDDEN)
        out = layer(x)
        assert out.shape == (NUM_TOKENS, 16 // tp)  # the fake gather returns this rank's part
        outs.append(out)
        if isinstance(group, SplitGroup):
            assert group.calls == (["all_gather"] if gather_output else [])
    check(torch.cat(outs, dim=-1), F.linear(x, weight, b), tp)


@pytest.mark.parametrize("tp", TP_SIZES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("input_is_parallel", [True, False])
def test_row_parallel_sum_equals_full(tp: int, bias: bool, input_is_parallel: bool) -> None:
    weight, x = randn(8, 16, seed=3), randn(NUM_TOKENS, 16, seed=4)
    b = randn(8, seed=5) if bias else None
    outs = []
    for rank in range(tp):
        group = split_group(rank, tp)
        layer = RowParallelLinear(
            16, 8, bias=bias, input_is_parallel=input_is_parallel, tp_group=group, prefix="o"
        )
        load_full(layer, {"weight": weight} | ({"bias": b} if bias else {}))
        assert layer.weight.shape == (8, 16 // tp)
        cols = slice(rank * 16 // tp, (rank + 1) * 16 // tp)
        out = layer(x[:, cols] if input_is_parallel else x)
        # The bias is added once: by rank 0.
        expected_part = F.linear(x[:, cols], weight[:, cols], b if rank == 0 else None)
        check(out, expected_part, 1)
        outs.append(out)
        if isinstance(group, SplitGroup):
            assert group.calls == ["all_reduce"]
    check(torch.stack(outs).sum(0), F.linear(x, weight, b), tp)


@pytest.mark.parametrize("tp", TP_SIZES)
@pytest.mark.parametrize("num_kv_heads", [1, 2, 4, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_qkv_parallel_shards_by_head(tp: int, num_kv_heads: int, bias: bool) -> None:
    heads, head_dim = 8, 4
    rows = (heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim)
    wq, wk, wv = (randn(n, HIDDEN, seed=6 + i) for i, n in enumerate(rows))
    bq, bk, bv = (randn(n, seed=9 + i) if bias else None for i, n in enumerate(rows))
    x = randn(NUM_TOKENS, HIDDEN, seed=12)
    # Full per-head outputs [T, H, D] of q, k, v.
    full = [
        F.linear(x, w, b).view(NUM_TOKENS, -1, head_dim) for w, b in ((wq, bq), (wk, bk), (wv, bv))
    ]
    replicas = max(1, tp // num_kv_heads)
    q_parts, k_parts, v_parts = [], [], []
    for rank in range(tp):
        layer = QKVParallelLinear(
            HIDDEN, head_dim, heads, num_kv_heads, bias=bias, tp_group=split_group(rank, tp)
        )
        shards = {"weight": {"q": wq, "k": wk, "v": wv}}
        if bias:
            shards["bias"] = {"q": bq, "k": bk, "v": bv}
        load_full(layer, shards)
        assert layer.num_heads == heads // tp
        assert layer.num_kv_heads == max(1, num_kv_heads // tp)
        assert layer.num_kv_head_replicas == replicas
        out = layer(x)  # [T, q_size + 2 * kv_size]
        q, k, v = out.split([layer.q_size, layer.kv_size, layer.kv_size], dim=-1)
        q_parts.append(q.reshape(NUM_TOKENS, -1, head_dim))
        kv_heads = slice(
            rank // replicas * layer.num_kv_heads, (rank // replicas + 1) * layer.num_kv_heads
        )
        for part, expected in ((k, full[1]), (v, full[2])):
            check(part.reshape(NUM_TOKENS, -1, head_dim), expected[:, kv_heads], tp)
        if rank % replicas == 0:  # the first replica of each KV head group
            k_parts.append(k.reshape(NUM_TOKENS, -1, head_dim))
            v_parts.append(v.reshape(NUM_TOKENS, -1, head_dim))
        if tp == 1:
            fused_bias = torch.cat([bq, bk, bv]) if bias else None
            assert torch.equal(out, F.linear(x, torch.cat([wq, wk, wv]), fused_bias))
    check(torch.cat(q_parts, dim=1), full[0], tp)
    check(torch.cat(k_parts, dim=1), full[1], tp)
    check(torch.cat(v_parts, dim=1), full[2], tp)


@pytest.mark.parametrize("tp", TP_SIZES)
@pytest.mark.parametrize("bias", [False, True])
def test_merged_gate_up_parallel(tp: int, bias: bool) -> None:
    sizes = (16, 8)  # unequal parts: offsets must follow each part's own shard size
    gate, up = randn(sizes[0], HIDDEN, seed=13), randn(sizes[1], HIDDEN, seed=14)
    gate_b, up_b = (randn(sizes[0], seed=15), randn(sizes[1], seed=16)) if bias else (None, None)
    x = randn(NUM_TOKENS, HIDDEN, seed=17)
    gates, ups = [], []
    for rank in range(tp):
        layer = MergedColumnParallelLinear(
            HIDDEN, list(sizes), bias=bias, tp_group=split_group(rank, tp), prefix="mlp.gate_up"
        )
        shards = {"weight": {0: gate, 1: up}} | ({"bias": {0: gate_b, 1: up_b}} if bias else {})
        load_full(layer, shards)
        out = layer(x)  # [T, G/tp + U/tp]: this rank's gate columns, then its up columns
        g, u = out.split([sizes[0] // tp, sizes[1] // tp], dim=-1)
        gates.append(g)
        ups.append(u)
        if tp == 1:
            w, b = torch.cat([gate, up]), (torch.cat([gate_b, up_b]) if bias else None)
            assert torch.equal(out, F.linear(x, w, b))
    check(torch.cat(gates, dim=-1), F.linear(x, gate, gate_b), tp)
    check(torch.cat(ups, dim=-1), F.linear(x, up, up_b), tp)


def test_replicated_linear_is_f_linear() -> None:
    weight, b, x = randn(6, HIDDEN, seed=18), randn(6, seed=19), randn(NUM_TOKENS, HIDDEN, seed=20)
    for rank in range(2):
        layer = ReplicatedLinear(HIDDEN, 6, bias=True, tp_group=SplitGroup(rank=rank, size=2))
        load_full(layer, {"weight": weight, "bias": b})
        assert torch.equal(layer(x), F.linear(x, weight, b))


@pytest.mark.parametrize(
    ("make", "name", "tensor", "shard_id", "pattern"),
    [
        (lambda: ColumnParallelLinear(HIDDEN, 16, bias=True, prefix="a.up"), "weight",
         torch.zeros(5, 5), None, r"a\.up\.weight: shape mismatch.*\(5, 5\).*\(16, 12\)"),
        (lambda: ColumnParallelLinear(HIDDEN, 16, bias=True, prefix="a.up"), "bias",
         torch.zeros(16), "q", r"a\.up\.bias has no shards; got shard_id='q'"),
        (lambda: RowParallelLinear(16, 8, bias=True, prefix="a.o"), "bias",
         torch.zeros(4), None, r"a\.o\.bias: shape mismatch.*\(4,\).*\(8,\)"),
        (lambda: QKVParallelLinear(HIDDEN, 4, 8, 2, bias=False, prefix="x.qkv_proj"), "weight",
         torch.zeros(8, HIDDEN), "z", r"x\.qkv_proj\.weight: unknown shard 'z'.*'q', 'k', 'v'"),
        (lambda: QKVParallelLinear(HIDDEN, 4, 8, 2, bias=False, prefix="x.qkv_proj"), "weight",
         torch.zeros(32, HIDDEN), "k", r"x\.qkv_proj\.weight \(shard 'k'\): shape mismatch"),
        (lambda: MergedColumnParallelLinear(HIDDEN, [8, 8], bias=False, prefix="m.gate_up_proj"),
         "weight", torch.zeros(8, HIDDEN), 2, r"m\.gate_up_proj\.weight: unknown shard 2"),
        (lambda: MergedColumnParallelLinear(HIDDEN, [8, 8], bias=False, prefix="m.gate_up_proj"),
         "weight", torch.zeros(8, HIDDEN), None, r"m\.gate_up_proj\.weight: unknown shard None"),
        (lambda: MergedColumnParallelLinear(HIDDEN, [8, 8], bias=False, prefix="m.gate_up_proj"),
         "weight", torch.zeros(8, HIDDEN), True, r"unknown shard True"),
    ],
)  # fmt: skip
def test_weight_loader_errors_name_the_parameter(make, name, tensor, shard_id, pattern) -> None:
    layer = make()
    param = dict(layer.named_parameters())[name]
    with pytest.raises(ValueError, match=pattern):
        param.weight_loader(param, tensor, shard_id)


def test_expert_id_is_rejected() -> None:
    layer = RowParallelLinear(16, 8, bias=False, prefix="down")
    with pytest.raises(ValueError, match=r"down\.weight: expert_id=3"):
        layer.weight.weight_loader(layer.weight, torch.zeros(8, 16), None, 3)


def test_indivisible_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="output_size=10 is not divisible by .* 4"):
        ColumnParallelLinear(HIDDEN, 10, bias=False, tp_group=SplitGroup(rank=0, size=4))
    with pytest.raises(ValueError, match="num_key_value_heads=3 is not divisible"):
        QKVParallelLinear(HIDDEN, 4, 12, 3, bias=False, tp_group=SplitGroup(rank=0, size=2))
    with pytest.raises(ValueError, match="num_key_value_heads=3: the tensor-parallel size 4"):
        QKVParallelLinear(HIDDEN, 4, 12, 3, bias=False, tp_group=SplitGroup(rank=0, size=4))


class RecordingMethod(LinearMethodBase):
    """A stand-in quant method: unquantized storage, records the hook calls."""

    def __init__(self) -> None:
        self.inner = UnquantizedLinearMethod()
        self.calls: list[str] = []

    def create_weights(self, layer: LinearBase, params_dtype, device, weight_loader) -> None:
        self.calls.append("create_weights")
        self.inner.create_weights(layer, params_dtype, device, weight_loader)

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        self.calls.append("process_weights_after_loading")

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        self.calls.append("apply")
        return self.inner.apply(layer, x, bias)


def test_quant_method_hooks() -> None:
    method = RecordingMethod()
    layer = RowParallelLinear(16, 8, bias=False, quant_method=method)
    assert layer.quant_method is method and method.calls == ["create_weights"]
    load_full(layer, {"weight": randn(8, 16, seed=21)})
    process_weights_after_loading(torch.nn.Sequential(layer))
    layer(randn(2, 16, seed=22))
    assert method.calls == ["create_weights", "process_weights_after_loading", "apply"]
