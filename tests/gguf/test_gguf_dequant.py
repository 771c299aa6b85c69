"""GGUF tensor types through the loader: files written with gguf.GGUFWriter, read back with
`dequantize_to_torch`, compared with the original values within each format's error, and
exactly with values built from hand-packed K-quant blocks."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from kestrel.loader import gguf_dequant
from kestrel.loader.gguf_dequant import UnsupportedTensorTypeError, dequantize_to_torch
from kestrel.loader.gguf_loader import GGUFFile
from tests.gguf.fixtures import write_gguf

Q = gguf.GGMLQuantizationType
ROWS, COLS = 6, 512

# type -> largest allowed |error| relative to the row's max |value| (half a quantization step
# plus fp16 scale rounding).
QUANTIZED = {
    Q.Q8_0: 1 / 127,
    Q.Q5_0: 1 / 15,
    Q.Q5_1: 1 / 31,
    Q.Q4_0: 1 / 7,
    Q.Q4_1: 1 / 15,
}


def _read_back(path, name: str, dtype=torch.float32) -> torch.Tensor:
    t = GGUFFile(path).tensor(name)
    return dequantize_to_torch(t.name, t.data, t.tensor_type, dtype)


@pytest.fixture
def original() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((ROWS, COLS)).astype(np.float32)


@pytest.mark.parametrize("qtype", sorted(QUANTIZED, key=lambda q: q.name), ids=lambda q: q.name)
def test_block_formats_round_trip(tmp_path, monkeypatch, original, qtype):
    # Chunks of 2 rows: the chunked path must stitch rows back in order.
    monkeypatch.setattr(gguf_dequant, "_CHUNK_BYTES", 2 * 4 * COLS)
    packed = gguf.quants.quantize(original, qtype)
    path = write_gguf(tmp_path / "q.gguf", "llama", {}, {"w": (packed, qtype)})
    got = _read_back(path, "w")
    assert got.shape == (ROWS, COLS) and got.dtype == torch.float32
    err = (got - torch.from_numpy(original)).abs().max(dim=1).values
    bound = QUANTIZED[qtype] * np.abs(original).max(axis=1)
    assert (err.numpy() <= bound).all(), (err, bound)
    assert err.max() > 0  # really quantized


def test_float_formats(tmp_path, original):
    bf16 = gguf.quants.quantize(original, Q.BF16)
    tensors = {"f32": original, "f16": original.astype(np.float16), "bf16": (bf16, Q.BF16)}
    path = write_gguf(tmp_path / "f.gguf", "llama", {}, tensors)
    x = torch.from_numpy(original)
    assert torch.equal(_read_back(path, "f32"), x)
    assert torch.equal(_read_back(path, "f16", torch.float16), x.to(torch.float16))
    # BF16 storage rounds to nearest even, as torch does.
    assert torch.equal(_read_back(path, "bf16", torch.bfloat16), x.to(torch.bfloat16))
    assert torch.equal(_read_back(path, "bf16"), x.to(torch.bfloat16).float())
    vec = write_gguf(tmp_path / "v.gguf", "llama", {}, {"v": original[0]})
    assert torch.equal(_read_back(vec, "v"), x[0])


# ---- K-quants: blocks of 256 values packed by hand, expected values from the packing --------


def _pack_k_scales(sc: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins -> the 12-byte K-quant scale field (Q4_K / Q5_K)."""
    out = np.zeros(12, dtype=np.uint8)
    for j in range(4):
        out[j] = sc[j] | ((sc[j + 4] >> 4) << 6)
        out[j + 4] = mins[j] | ((mins[j + 4] >> 4) << 6)
        out[j + 8] = (sc[j + 4] & 0xF) | ((mins[j + 4] & 0xF) << 4)
    return out


def _f16_bytes(x: float) -> np.ndarray:
    return np.array([x], dtype=np.float16).view(np.uint8)


def _q4_k_block(rng) -> tuple[np.ndarray, np.ndarray]:
    d, dmin = 0.0625, 0.125
    sc, mins = rng.integers(0, 64, 8), rng.integers(0, 64, 8)
    q = rng.integers(0, 16, 256)
    qs = np.zeros(128, dtype=np.uint8)
    for chunk in range(4):  # 64 values: low nibbles = first 32, high nibbles = next 32
        lo, hi = q[64 * chunk : 64 * chunk + 32], q[64 * chunk + 32 : 64 * chunk + 64]
        qs[32 * chunk : 32 * chunk + 32] = lo | (hi << 4)
    raw = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(sc, mins), qs])
    sub = np.arange(256) // 32
    return raw, d * sc[sub] * q - dmin * mins[sub]


def _q5_k_block(rng) -> tuple[np.ndarray, np.ndarray]:
    d, dmin = 0.03125, 0.25
    sc, mins = rng.integers(0, 64, 8), rng.integers(0, 64, 8)
    q = rng.integers(0, 32, 256)
    qs = np.zeros(128, dtype=np.uint8)
    qh = np.zeros(32, dtype=np.uint8)
    for chunk in range(4):
        lo, hi = q[64 * chunk : 64 * chunk + 32], q[64 * chunk + 32 : 64 * chunk + 64]
        qs[32 * chunk : 32 * chunk + 32] = (lo & 0xF) | ((hi & 0xF) << 4)
        qh |= ((lo >> 4) << (2 * chunk)).astype(np.uint8)
        qh |= ((hi >> 4) << (2 * chunk + 1)).astype(np.uint8)
    raw = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(sc, mins), qh, qs])
    sub = np.arange(256) // 32
    return raw, d * sc[sub] * q - dmin * mins[sub]


def _q6_k_block(rng) -> tuple[np.ndarray, np.ndarray]:
    d = 0.015625
    scales = rng.integers(-128, 128, 16).astype(np.int8)
    q = rng.integers(0, 64, 256)
    ql = np.zeros(128, dtype=np.uint8)
    qh = np.zeros(64, dtype=np.uint8)
    for half in range(2):  # 128 values each: ql 64 bytes, qh 32 bytes
        v = q[128 * half : 128 * half + 128]
        a, b, c, e = v[0:32], v[32:64], v[64:96], v[96:128]
        ql[64 * half : 64 * half + 32] = (a & 0xF) | ((c & 0xF) << 4)
        ql[64 * half + 32 : 64 * half + 64] = (b & 0xF) | ((e & 0xF) << 4)
        qh[32 * half : 32 * half + 32] = (
            (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6)
        )
    raw = np.concatenate([ql, qh, scales.view(np.uint8), _f16_bytes(d)])
    return raw, d * scales[np.arange(256) // 16].astype(np.float64) * (q - 32)


@pytest.mark.parametrize(
    ("qtype", "make_block"),
    [(Q.Q4_K, _q4_k_block), (Q.Q5_K, _q5_k_block), (Q.Q6_K, _q6_k_block)],
    ids=["Q4_K", "Q5_K", "Q6_K"],
)
def test_k_quants_decode_hand_packed_blocks(tmp_path, qtype, make_block):
    rng = np.random.default_rng(1)
    rows = 3
    blocks = [[make_block(rng) for _ in range(2)] for _ in range(rows)]  # [3, 512] values
    raw = np.stack([np.concatenate([b[0] for b in row]) for row in blocks]).astype(np.uint8)
    expected = np.stack([np.concatenate([b[1] for b in row]) for row in blocks])
    assert raw.shape == (rows, 2 * gguf.GGML_QUANT_SIZES[qtype][1])
    path = write_gguf(tmp_path / "k.gguf", "llama", {}, {"w": (raw, qtype)})
    got = _read_back(path, "w")
    assert got.shape == (rows, 512)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-6)


def test_unsupported_tensor_type_names_itself(tmp_path):
    raw = np.zeros((2, 2 * gguf.GGML_QUANT_SIZES[Q.Q8_1][1]), dtype=np.uint8)
    path = write_gguf(tmp_path / "u.gguf", "llama", {}, {"blk.0.attn_q.weight": (raw, Q.Q8_1)})
    with pytest.raises(
        UnsupportedTensorTypeError, match=r"'blk.0.attn_q.weight' is stored as Q8_1"
    ):
        _read_back(path, "blk.0.attn_q.weight")
