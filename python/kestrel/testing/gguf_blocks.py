"""Random GGUF weights for tests and benchmarks: valid raw blocks of the kernel types.

Q8_0 and Q4_0 come from `gguf.quants.quantize` of normal values; the K-quants (which the
`gguf` package cannot quantize) are random bytes with their fp16 super-block scales set to
small finite values, so every block is valid and the weights stay below about 2 in magnitude.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quantize

Q = GGMLQuantizationType

# Byte offsets of the fp16 scale fields in each block: (d, dmin) or (d,). Random bytes there
# could be inf / NaN, so writers of random blocks set them (also benchmarks/make_quant_gguf.py).
F16_SCALE_OFFSETS = {
    Q.Q8_0: (0,),
    Q.Q4_0: (0,),
    Q.Q4_1: (0, 2),
    Q.Q5_0: (0,),
    Q.Q5_1: (0, 2),
    Q.Q2_K: (80, 82),
    Q.Q3_K: (108,),
    Q.Q4_K: (0, 2),
    Q.Q5_K: (0, 2),
    Q.Q6_K: (208,),
    Q.IQ4_NL: (0,),
}
_K_TYPES = (Q.Q4_K, Q.Q5_K, Q.Q6_K)  # the K-quants random_blocks writes


def random_blocks(
    qtype: GGMLQuantizationType,
    n: int,
    k: int,
    rng: np.random.Generator,
    *,
    centered: bool = False,
) -> np.ndarray:
    """uint8 [n, k / block_elems * block_bytes]: a random W [n, k] as raw GGUF blocks.

    `centered` (Q4_K / Q5_K): every sub-block's min equals its scale and dmin is d times the
    middle quant, so the weights average zero (a model made of them does not collapse onto one
    token); otherwise the packed scales and mins are unconstrained random bytes."""
    elems, nbytes = GGML_QUANT_SIZES[qtype]
    if k % elems != 0:
        raise ValueError(f"{qtype.name}: K={k} is not a multiple of {elems}")
    if qtype in (Q.Q8_0, Q.Q4_0):
        values = rng.standard_normal((n, k)).astype(np.float32) * 0.05
        return np.ascontiguousarray(quantize(values, qtype))
    if qtype not in _K_TYPES:
        raise ValueError(f"random_blocks: unsupported type {qtype.name}")
    blocks = rng.integers(0, 256, size=(n * (k // elems), nbytes), dtype=np.uint8)
    for offset in F16_SCALE_OFFSETS[qtype]:
        scale = (rng.random(blocks.shape[0]) * 4e-4 + 1e-4).astype(np.float16)
        blocks[:, offset : offset + 2] = scale.view(np.uint8).reshape(-1, 2)
    if centered and qtype in (Q.Q4_K, Q.Q5_K):
        scales = blocks[:, 4:16]
        scales[:, 4:8] = scales[:, 0:4]  # min j = scale j for j < 4 ...
        scales[:, 8:12] = (scales[:, 8:12] & 0x0F) * 0x11  # ... and for j >= 4
        middle = 7.5 if qtype == Q.Q4_K else 15.5
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
        blocks[:, 2:4] = (d * middle).astype(np.float16).view(np.uint8)
    return blocks.reshape(n, -1)
