"""The torch reference of the GGUF block formats (the kernels' oracle) against the `gguf`
package's numpy dequantization, on blocks written by the `gguf` package (Q8_0, Q4_0) or random
valid blocks (K-quants), with odd row counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from kestrel.ops import gguf as gguf_ops
from kestrel.testing.gguf_blocks import random_blocks

TYPES = [Q.Q8_0, Q.Q4_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]


def _k_for(qtype: Q, blocks: int) -> int:
    return gguf_ops.block_size(qtype)[0] * blocks


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n, blocks", [(1, 1), (7, 3), (33, 2)])
def test_dequantize_reference_is_bit_exact(qtype, n, blocks):
    rng = np.random.default_rng([int(qtype), n, blocks])
    k = _k_for(qtype, blocks)
    raw = random_blocks(qtype, n, k, rng)
    assert raw.shape == (n, gguf_ops.row_bytes(qtype, k))
    want = dequantize(raw, qtype)
    got = gguf_ops.dequantize_reference(torch.from_numpy(raw), qtype)
    assert got.dtype == torch.float32 and tuple(got.shape) == (n, k)
    assert np.array_equal(got.numpy(), want)
    assert np.abs(want).max() > 0  # the blocks are not all zero


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_reference_rounds_once_to_dtype(qtype):
    raw = random_blocks(qtype, 5, _k_for(qtype, 2), np.random.default_rng(1))
    want = torch.from_numpy(dequantize(raw, qtype)).to(torch.bfloat16)
    got = gguf_ops.dequantize_reference(torch.from_numpy(raw), qtype, torch.bfloat16)
    assert torch.equal(got, want)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matmul_reference_matches_fp32_matmul(qtype):
    rng = np.random.default_rng(int(qtype))
    n, k = 19, _k_for(qtype, 3)
    raw = random_blocks(qtype, n, k, rng)
    x = torch.from_numpy(rng.standard_normal((4, k)).astype(np.float32))
    want = x.double() @ torch.from_numpy(dequantize(raw, qtype)).double().T
    got = gguf_ops.gguf_matmul_reference(x, torch.from_numpy(raw), qtype)
    assert float((got.double() - want).norm() / want.norm()) < 1e-6


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K], ids=lambda t: t.name)
def test_centered_random_blocks_average_zero(qtype):
    raw = random_blocks(qtype, 64, 1024, np.random.default_rng(5), centered=True)
    w = dequantize(raw, qtype)
    assert abs(w.mean()) < 0.05 * w.std()
    assert np.array_equal(gguf_ops.dequantize_reference(torch.from_numpy(raw), qtype).numpy(), w)


def test_quantize_gives_the_values_back_within_q8_0_rounding():
    # The Q8_0 blocks really encode the values they were made from (a layout sanity check).
    rng = np.random.default_rng(3)
    values = rng.standard_normal((6, 64)).astype(np.float32)
    from gguf.quants import quantize

    raw = torch.from_numpy(quantize(values, Q.Q8_0))
    got = gguf_ops.dequantize_reference(raw, Q.Q8_0).numpy()
    assert np.abs(got - values).max() <= np.abs(values).max() / 127


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="Q4_1 has no GGUF kernel; supported: Q4_0, Q4_K"):
        gguf_ops.block_size(Q.Q4_1)
    with pytest.raises(ValueError, match="multiple of 256 elements; got K=96"):
        gguf_ops.row_bytes(Q.Q4_K, 96)
    with pytest.raises(ValueError, match="uint8 \\[N, row_bytes\\].*float32"):
        gguf_ops.dequantize_reference(torch.zeros(2, 34), Q.Q8_0)
    with pytest.raises(ValueError, match="whole number of 34-byte blocks; got rows of 35"):
        gguf_ops.dequantize_reference(torch.zeros(2, 35, dtype=torch.uint8), Q.Q8_0)
    with pytest.raises(ValueError, match="needs the CUDA kernels"):
        gguf_ops.gguf_gemv(torch.zeros(1, 32), torch.zeros(2, 34, dtype=torch.uint8), Q.Q8_0)
