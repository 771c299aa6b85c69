"""GGUFLinearMethod on CPU (the torch reference path): raw GGUF blocks loaded through the layers'
shard logic (fused q/k/v and gate/up with per-part types, tensor-parallel row and column
shards) give x @ W^T of the dequantized weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from kestrel.layers import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from kestrel.layers.gguf_linear import GGUFLinearMethod, gguf_weight_bytes
from kestrel.testing.gguf_blocks import random_blocks
from tests.layers.tp_sim import split_group


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _dense(raw: np.ndarray, qtype: Q) -> torch.Tensor:
    return torch.from_numpy(dequantize(raw, qtype)).double()


def test_qkv_with_mixed_part_types_and_bias():
    rng = np.random.default_rng(0)
    hidden, head_dim, heads, kv_heads = 256, 32, 4, 2
    types = [Q.Q4_K, Q.Q4_K, Q.Q6_K]  # a Q4_K_M file's usual q/k/v
    layer = QKVParallelLinear(
        hidden, head_dim, heads, kv_heads, bias=True,
        quant_method=GGUFLinearMethod(types), prefix="attn.qkv_proj",
    )  # fmt: skip
    assert [s.qtype for s in layer.gguf_segments] == [Q.Q4_K, Q.Q6_K]  # q+k merged
    assert all(s.byte_offset % 16 == 0 for s in layer.gguf_segments)
    rows = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    raws = [random_blocks(t, r, hidden, rng) for t, r in zip(types, rows)]
    for shard, raw in zip("qkv", raws):
        layer.weight.weight_loader(layer.weight, torch.from_numpy(raw), shard)
    bias = torch.randn(sum(rows))
    for shard, part in zip("qkv", bias.split(rows)):
        layer.bias.weight_loader(layer.bias, part, shard)
    x = torch.randn(5, hidden)
    w = torch.cat([_dense(r, t) for r, t in zip(raws, types)])
    assert _rel(layer(x), x.double() @ w.T + bias.double()) < 1e-6
    assert gguf_weight_bytes(layer) == {"Q4_K": 192 * 144, "Q6_K": 64 * 210}


def test_merged_gate_up_of_one_type_is_one_segment():
    rng = np.random.default_rng(1)
    layer = MergedColumnParallelLinear(
        96, [40, 40], bias=False, quant_method=GGUFLinearMethod([Q.Q8_0, Q.Q8_0])
    )
    assert len(layer.gguf_segments) == 1 and layer.gguf_segments[0].rows == 80
    raws = [random_blocks(Q.Q8_0, 40, 96, rng) for _ in range(2)]
    for shard, raw in enumerate(raws):
        layer.weight.weight_loader(layer.weight, torch.from_numpy(raw), shard)
    x = torch.randn(3, 96, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    w = torch.cat([_dense(r, Q.Q8_0) for r in raws])
    assert _rel(out, x.double() @ w.T) < 1e-2  # bf16 output rounding only


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q5_K])
def test_row_parallel_shards_whole_blocks_of_columns(qtype):
    rng = np.random.default_rng(int(qtype))
    k = 512
    raw = random_blocks(qtype, 24, k, rng)
    x = torch.randn(2, k)
    total = torch.zeros(2, 24, dtype=torch.float64)
    for rank in range(2):
        layer = RowParallelLinear(
            k, 24, bias=False, tp_group=split_group(rank, 2), quant_method=GGUFLinearMethod([qtype])
        )
        layer.weight.weight_loader(layer.weight, torch.from_numpy(raw))
        total += layer(x[:, rank * 256 : (rank + 1) * 256]).double()  # the sum an all-reduce makes
    assert _rel(total, x.double() @ _dense(raw, qtype).T) < 1e-6


def test_column_parallel_rank_holds_its_rows():
    rng = np.random.default_rng(2)
    raw = random_blocks(Q.Q6_K, 32, 256, rng)
    x = torch.randn(3, 256)
    full = x.double() @ _dense(raw, Q.Q6_K).T
    for rank in range(2):
        layer = ColumnParallelLinear(
            256, 32, bias=False, tp_group=split_group(rank, 2),
            quant_method=GGUFLinearMethod([Q.Q6_K]),
        )  # fmt: skip
        layer.weight.weight_loader(layer.weight, torch.from_numpy(raw))
        assert _rel(layer(x), full[:, rank * 16 : (rank + 1) * 16]) < 1e-6


def test_load_errors_name_the_parameter():
    layer = QKVParallelLinear(
        256, 32, 4, 2, bias=False, quant_method=GGUFLinearMethod([Q.Q4_K] * 3), prefix="p"
    )
    good_k = torch.zeros(64, 144, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"p.weight \(shard 'k'\): expected raw Q4_K blocks"):
        layer.weight.weight_loader(layer.weight, torch.zeros(64, 210, dtype=torch.uint8), "k")
    with pytest.raises(ValueError, match="expected raw Q4_K blocks uint8 \\(64, 144\\); got "):
        layer.weight.weight_loader(layer.weight, good_k.float(), "k")
    with pytest.raises(ValueError, match="unknown shard 'x'"):
        layer.weight.weight_loader(layer.weight, good_k, "x")
    plain = ReplicatedLinear(64, 8, bias=False, quant_method=GGUFLinearMethod([Q.Q8_0]))
    with pytest.raises(ValueError, match="has no shards; got shard_id=0"):
        plain.weight.weight_loader(plain.weight, torch.zeros(8, 68, dtype=torch.uint8), 0)


def test_construction_errors():
    with pytest.raises(ValueError, match="2 GGUF part types for 3 output parts"):
        QKVParallelLinear(256, 32, 4, 2, bias=False, quant_method=GGUFLinearMethod([Q.Q4_K] * 2))
    with pytest.raises(ValueError, match="down: Q4_K rows need K a positive multiple of 256"):
        RowParallelLinear(
            256, 8, bias=False, tp_group=split_group(0, 2), prefix="down",
            quant_method=GGUFLinearMethod([Q.Q4_K]),
        )  # fmt: skip
    with pytest.raises(ValueError, match="F16 has no GGUF kernel"):
        GGUFLinearMethod([Q.F16])
