"""GGML block formats -> dense tensors, in torch, on whatever device holds the raw bytes.

Each dequantizer takes the blocks of one format as a uint8 tensor [num_blocks, block_bytes] and
returns float32 [num_blocks, block_elems], computed with the same float32 operations in the same
order as the `gguf` package's numpy code (so the results are bit-identical to
`gguf.quants.dequantize`; tests/gguf/test_gguf_dequant_torch.py checks every type). The work is
whole-tensor tensor ops (no Python loop over blocks), in chunks of blocks that bound the float32
working memory. The layouts are llama.cpp's `block_*` structs (ggml-common.h), little-endian.
Types not listed in TORCH_TYPES (the IQ*, TQ* and MXFP4 grids) stay on the `gguf` package's
CPU path (`gguf_dequant.dequantize_to_torch`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

Q = GGMLQuantizationType
Blocks = torch.Tensor  # uint8 [num_blocks, block_bytes]

# Float32 elements dequantized per chunk (each chunk needs a few such temporaries).
_CHUNK_ELEMS = 16 << 20


def _f16(blocks: Blocks, offset: int) -> torch.Tensor:
    """The little-endian float16 at byte `offset` of every block, as float32 [num_blocks, 1]."""
    return blocks[:, offset : offset + 2].contiguous().view(torch.float16).float()


def _shifts(like: torch.Tensor, step: int) -> torch.Tensor:
    """Shift amounts 0, step, ... < 8 as uint8 on `like`'s device (made there, so no
    host-to-device copy stalls the load pipeline)."""
    return torch.arange(0, 8, step, dtype=torch.uint8, device=like.device)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, k] bytes -> [n, 2k]: all the low nibbles, then all the high nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """[n, 4] bytes of a little-endian uint32 -> [n, 32] of its bits 0..31 (0 or 1)."""
    n = qh.shape[0]
    return ((qh.reshape(n, 4, 1) >> _shifts(qh, 1).reshape(1, 1, 8)) & 1).reshape(n, 32)


# ---- 32-element formats -----------------------------------------------------------------------


def _q8_0(blocks: Blocks) -> torch.Tensor:  # d f16, qs int8[32]: x = q * d
    return blocks[:, 2:].view(torch.int8).float() * _f16(blocks, 0)


def _q4_0(blocks: Blocks) -> torch.Tensor:  # d f16, qs[16]: x = d * (q - 8)
    q = _nibbles(blocks[:, 2:]).to(torch.int8) - 8
    return _f16(blocks, 0) * q.float()


def _q4_1(blocks: Blocks) -> torch.Tensor:  # d f16, m f16, qs[16]: x = d * q + m
    q = _nibbles(blocks[:, 4:]).float()
    return _f16(blocks, 0) * q + _f16(blocks, 2)


def _q5_0(blocks: Blocks) -> torch.Tensor:  # d f16, qh u32, qs[16]: x = d * (q - 16)
    q = (_nibbles(blocks[:, 6:]) | (_bits32(blocks[:, 2:6]) << 4)).to(torch.int8) - 16
    return _f16(blocks, 0) * q.float()


def _q5_1(blocks: Blocks) -> torch.Tensor:  # d f16, m f16, qh u32, qs[16]: x = d * q + m
    q = (_nibbles(blocks[:, 8:]) | (_bits32(blocks[:, 4:8]) << 4)).float()
    return _f16(blocks, 0) * q + _f16(blocks, 2)


# ---- 256-element K formats --------------------------------------------------------------------


def _q2_k(blocks: Blocks) -> torch.Tensor:
    """scales[16] (low nibble scale, high nibble min), qs[64], d f16, dmin f16.

    Value h*128 + j*32 + i (h half, j 2-bit field, i < 32) is bits 2j of qs[h*32 + i], in the
    16-value group h*8 + j*2 + i // 16: x = d * scale * q - dmin * min.
    """
    n = blocks.shape[0]
    scales = blocks[:, :16]
    dl = (_f16(blocks, 80) * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (_f16(blocks, 82) * (scales >> 4).float()).reshape(n, 16, 1)
    q = (blocks[:, 16:80].reshape(n, 2, 1, 32) >> _shifts(blocks, 2).reshape(1, 1, 4, 1)) & 3
    return (dl * q.reshape(n, 16, 16).float() - ml).reshape(n, 256)


def _q3_k_scales(packed: torch.Tensor) -> torch.Tensor:
    """12 bytes -> 16 signed scales: scale i = low 4 bits (byte i % 8, nibble i // 8) | high 2
    bits (byte 8 + i % 4, pair i // 4) << 4, minus 32. Returns float32 [n, 16]."""
    n = packed.shape[0]
    low = (packed[:, :8].reshape(n, 1, 8) >> _shifts(packed, 4).reshape(1, 2, 1)) & 0x0F
    high = (packed[:, 8:].reshape(n, 1, 4) >> _shifts(packed, 2).reshape(1, 4, 1)) & 3
    scales = low.reshape(n, 16) | (high.reshape(n, 16) << 4)
    return (scales.to(torch.int8) - 32).float()


def _q3_k(blocks: Blocks) -> torch.Tensor:
    """hmask[32], qs[64], scales[12], d f16.

    Value h*128 + j*32 + i: low 2 bits = bits 2j of qs[h*32 + i], minus 4 unless bit h*4 + j of
    hmask[i] is set; group (scale) h*8 + j*2 + i // 16: x = d * scale * q.
    """
    n = blocks.shape[0]
    dl = (_f16(blocks, 108) * _q3_k_scales(blocks[:, 96:108])).reshape(n, 16, 1)
    low = (blocks[:, 32:96].reshape(n, 2, 1, 32) >> _shifts(blocks, 2).reshape(1, 1, 4, 1)) & 3
    high = (blocks[:, :32].reshape(n, 1, 32) >> _shifts(blocks, 1).reshape(1, 8, 1)) & 1
    q = low.reshape(n, 256).to(torch.int8) - ((high.reshape(n, 256) ^ 1) << 2).to(torch.int8)
    return (dl * q.reshape(n, 16, 16).float()).reshape(n, 256)


def _k_scale_min(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12-byte scale field of Q4_K / Q5_K -> eight 6-bit (scale, min) pairs, float32 [n, 8].

    Bytes 0-3 hold scales 0-3 (low 6 bits), bytes 4-7 mins 0-3; scales / mins 4-7 take their low
    4 bits from the low / high nibble of bytes 8-11 and their top 2 bits from the top 2 bits of
    bytes 0-3 / 4-7.
    """
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scale = torch.cat([a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)], dim=-1)
    minimum = torch.cat([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], dim=-1)
    return scale.float(), minimum.float()


def _q4_k(blocks: Blocks) -> torch.Tensor:
    """d f16, dmin f16, scales[12], qs[128]. Value c*64 + k*32 + i (c < 4, k < 2) is nibble k of
    qs[c*32 + i], in group c*2 + k: x = d * scale * q - dmin * min."""
    n = blocks.shape[0]
    scale, minimum = _k_scale_min(blocks[:, 4:16])
    d = (_f16(blocks, 0) * scale).reshape(n, 8, 1)
    dm = (_f16(blocks, 2) * minimum).reshape(n, 8, 1)
    q = (blocks[:, 16:].reshape(n, 4, 1, 32) >> _shifts(blocks, 4).reshape(1, 1, 2, 1)) & 0x0F
    return (d * q.reshape(n, 8, 32).float() - dm).reshape(n, 256)


def _q5_k(blocks: Blocks) -> torch.Tensor:
    """d f16, dmin f16, scales[12], qh[32], qs[128]. As Q4_K, plus bit c*2 + k of qh[i] as the
    fifth bit of value c*64 + k*32 + i."""
    n = blocks.shape[0]
    scale, minimum = _k_scale_min(blocks[:, 4:16])
    d = (_f16(blocks, 0) * scale).reshape(n, 8, 1)
    dm = (_f16(blocks, 2) * minimum).reshape(n, 8, 1)
    low = (blocks[:, 48:].reshape(n, 4, 1, 32) >> _shifts(blocks, 4).reshape(1, 1, 2, 1)) & 0x0F
    high = (blocks[:, 16:48].reshape(n, 1, 32) >> _shifts(blocks, 1).reshape(1, 8, 1)) & 1
    q = low.reshape(n, 8, 32) | (high << 4)
    return (d * q.float() - dm).reshape(n, 256)


def _q6_k(blocks: Blocks) -> torch.Tensor:
    """ql[128], qh[64], scales int8[16], d f16. Value h*128 + t*32 + i (half h, quarter t):
    nibble t // 2 of ql[h*64 + (t % 2)*32 + i] | bits 2t of qh[h*32 + i] << 4, minus 32, in group
    (value // 16): x = d * scale * q."""
    n = blocks.shape[0]
    d = (_f16(blocks, 208) * blocks[:, 192:208].view(torch.int8).float()).reshape(n, 16, 1)
    low = (blocks[:, :128].reshape(n, 2, 1, 64) >> _shifts(blocks, 4).reshape(1, 1, 2, 1)) & 0x0F
    high = (blocks[:, 128:192].reshape(n, 2, 1, 32) >> _shifts(blocks, 2).reshape(1, 1, 4, 1)) & 3
    q = (low.reshape(n, 2, 4, 32) | (high << 4)).to(torch.int8) - 32
    return (d * q.reshape(n, 16, 16).float()).reshape(n, 256)


# ---- dispatch -----------------------------------------------------------------------------------

_FLOAT_DTYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
_BLOCK_DEQUANTIZERS: dict[GGMLQuantizationType, Callable[[Blocks], torch.Tensor]] = {
    Q.Q8_0: _q8_0,
    Q.Q4_0: _q4_0,
    Q.Q4_1: _q4_1,
    Q.Q5_0: _q5_0,
    Q.Q5_1: _q5_1,
    Q.Q2_K: _q2_k,
    Q.Q3_K: _q3_k,
    Q.Q4_K: _q4_k,
    Q.Q5_K: _q5_k,
    Q.Q6_K: _q6_k,
}
# The float types (reinterpreted, then converted) and all the GGML types dequantized here (the
# rest keep the gguf package's CPU path).
FLOAT_TYPES: frozenset[GGMLQuantizationType] = frozenset(_FLOAT_DTYPES)
TORCH_TYPES: frozenset[GGMLQuantizationType] = frozenset(_FLOAT_DTYPES) | frozenset(
    _BLOCK_DEQUANTIZERS
)


def dequantize_raw(
    raw: torch.Tensor, qtype: GGMLQuantizationType, dtype: torch.dtype
) -> torch.Tensor:
    """raw: uint8 [..., row_bytes], a GGML tensor's data in file order (rows first), on any
    device. Returns [..., row_elems] in `dtype` on the same device. F32/F16/BF16 are
    reinterpreted and converted; block formats are dequantized through float32 in chunks of
    whole blocks. Raises ValueError for a type outside TORCH_TYPES or a row that is not a whole
    number of blocks."""
    if raw.dtype != torch.uint8 or raw.dim() == 0:
        raise ValueError(f"raw GGML data must be a uint8 tensor of >= 1 dim, got {raw.dtype}")
    qtype = GGMLQuantizationType(qtype)
    if qtype not in TORCH_TYPES:
        raise ValueError(
            f"GGML type {qtype.name} has no torch dequantizer; torch types: "
            f"{', '.join(sorted(t.name for t in TORCH_TYPES))}"
        )
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    row_bytes = raw.shape[-1]
    if row_bytes % block_bytes != 0:
        raise ValueError(
            f"row of {row_bytes} bytes is not a whole number of {qtype.name} blocks of "
            f"{block_bytes} bytes"
        )
    shape = (*raw.shape[:-1], row_bytes // block_bytes * block_elems)
    raw = raw.contiguous()
    if qtype in _FLOAT_DTYPES:
        return raw.view(_FLOAT_DTYPES[qtype]).to(dtype).reshape(shape)
    blocks = raw.reshape(-1, block_bytes)  # [num_blocks, block_bytes]
    dequantize = _BLOCK_DEQUANTIZERS[qtype]
    out = torch.empty((blocks.shape[0], block_elems), dtype=dtype, device=raw.device)
    step = max(1, _CHUNK_ELEMS // block_elems)
    for start in range(0, blocks.shape[0], step):
        out[start : start + step] = dequantize(blocks[start : start + step])
    return out.reshape(shape)
