"""GGML tensor data (as stored in a GGUF file) -> a torch tensor of the run dtype.

The block formats themselves are decoded by `gguf.quants.dequantize` (the `gguf` package that
llama.cpp publishes); this module picks the types we accept, bounds the float32 working memory
by dequantizing a tensor in row chunks, and converts each chunk to the run dtype at once.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

Q = GGMLQuantizationType

# Weight formats we load. Integer types (I8..I64) and the activation-only formats Q8_1 / Q8_K
# never hold model weights, so a file that uses them for a weight is rejected by name.
SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = frozenset(
    {
        Q.F32,
        Q.F16,
        Q.BF16,
        Q.Q4_0,
        Q.Q4_1,
        Q.Q5_0,
        Q.Q5_1,
        Q.Q8_0,
        Q.Q2_K,
        Q.Q3_K,
        Q.Q4_K,
        Q.Q5_K,
        Q.Q6_K,
        Q.IQ1_S,
        Q.IQ1_M,
        Q.IQ2_XXS,
        Q.IQ2_XS,
        Q.IQ2_S,
        Q.IQ3_XXS,
        Q.IQ3_S,
        Q.IQ4_NL,
        Q.IQ4_XS,
        Q.TQ1_0,
        Q.TQ2_0,
        Q.MXFP4,
    }
)

# Float32 working memory per dequantized chunk (bytes); bounds the peak on huge embeddings.
_CHUNK_BYTES = 64 << 20


class UnsupportedTensorTypeError(ValueError):
    """A GGUF tensor is stored in a GGML type Kestrel cannot dequantize."""


def supported_type_names() -> list[str]:
    return sorted(t.name for t in SUPPORTED_TYPES)


def check_tensor_type(name: str, tensor_type: int) -> GGMLQuantizationType:
    """The tensor's GGML type, or UnsupportedTensorTypeError naming the tensor and the type."""
    try:
        qtype = GGMLQuantizationType(int(tensor_type))
    except ValueError:
        raise UnsupportedTensorTypeError(
            f"tensor {name!r} has unknown GGML type id {int(tensor_type)}; supported types: "
            f"{', '.join(supported_type_names())}"
        ) from None
    if qtype not in SUPPORTED_TYPES:
        raise UnsupportedTensorTypeError(
            f"tensor {name!r} is stored as {qtype.name}, which Kestrel cannot load; supported "
            f"types: {', '.join(supported_type_names())}"
        )
    return qtype


def dequantize_to_torch(
    name: str, data: np.ndarray, tensor_type: int, dtype: torch.dtype
) -> torch.Tensor:
    """`data`: the tensor's memory-mapped array as GGUFReader exposes it (the logical shape in
    numpy order for F32/F16; raw uint8 blocks [..., row_bytes] for block formats). Returns a
    contiguous CPU tensor of the logical shape (rows first, numpy order) in `dtype`.

    Dequantizes at most ~64 MiB of float32 at a time, so peak extra host memory is one chunk
    plus the result in `dtype`.
    """
    qtype = check_tensor_type(name, tensor_type)
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    if qtype in (Q.F32, Q.F16) and data.dtype != np.uint8:
        logical_shape = tuple(data.shape)
        rows = data.reshape(-1, logical_shape[-1]) if data.ndim > 1 else data.reshape(1, -1)
    else:
        byte_shape = tuple(data.shape)
        if byte_shape[-1] % block_bytes != 0:
            raise ValueError(
                f"tensor {name!r}: row of {byte_shape[-1]} bytes is not a whole number of "
                f"{qtype.name} blocks of {block_bytes} bytes"
            )
        logical_shape = (*byte_shape[:-1], byte_shape[-1] // block_bytes * block_elems)
        rows = data.reshape(-1, byte_shape[-1])
    num_rows, row_elems = rows.shape[0], logical_shape[-1]
    out = torch.empty((num_rows, row_elems), dtype=dtype)  # [rows, row_elems]
    step = max(1, _CHUNK_BYTES // (4 * row_elems))
    for start in range(0, num_rows, step):
        chunk = np.ascontiguousarray(rows[start : start + step])
        values = dequantize(chunk, qtype)  # [chunk_rows, row_elems] float32 (or float16 view)
        out[start : start + step].copy_(torch.from_numpy(np.array(values, dtype=np.float32)))
    return out.reshape(logical_shape)
