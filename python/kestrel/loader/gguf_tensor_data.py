"""One GGUF tensor's data on the device: its raw GGML bytes (`gguf_tensor_bytes`) or its values
in the run dtype (`gguf_tensor_to_device`), through the staged copy of `loader.staging`.

Shapes are numpy order (rows first): a GGML tensor with ne = [ne0, ne1] (ne0 elements per row)
is [ne1, ne0] values, stored as [ne1, ne0 / block_elems * block_bytes] bytes.
"""

from __future__ import annotations

import math

import torch
from gguf import GGML_QUANT_SIZES
from gguf.gguf_reader import ReaderTensor

from kestrel.loader.gguf_dequant import check_tensor_type, dequantize_to_torch
from kestrel.loader.staging import DeviceStager, file_bytes, normalize_device
from kestrel.ops.ggml_dequant import FLOAT_TYPES, TORCH_TYPES, dequantize_raw


def gguf_value_shape(tensor: ReaderTensor) -> tuple[int, ...]:
    """The tensor's logical shape in numpy order (reversed GGML ne)."""
    return tuple(int(n) for n in reversed(list(tensor.shape)))


def gguf_byte_shape(tensor: ReaderTensor) -> tuple[int, ...]:
    """The shape of the tensor's raw data as uint8: the value shape with its last (row)
    dimension in bytes. Raises ValueError naming the tensor when the row is not a whole number
    of blocks or the byte count disagrees with the file."""
    qtype = check_tensor_type(tensor.name, tensor.tensor_type)
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    shape = gguf_value_shape(tensor)
    if not shape or shape[-1] % block_elems != 0:
        raise ValueError(
            f"tensor {tensor.name!r}: shape {shape} has rows that are not a whole number of "
            f"{qtype.name} blocks of {block_elems} values"
        )
    byte_shape = (*shape[:-1], shape[-1] // block_elems * block_bytes)
    if math.prod(byte_shape) != int(tensor.n_bytes):
        raise ValueError(
            f"tensor {tensor.name!r}: {int(tensor.n_bytes)} bytes in the file, but shape "
            f"{shape} of {qtype.name} needs {math.prod(byte_shape)}"
        )
    return byte_shape


def _staged_bytes(tensor: ReaderTensor, stager: DeviceStager) -> torch.Tensor:
    src = file_bytes(tensor.data)  # a view of the file mapping
    byte_shape = gguf_byte_shape(tensor)
    return stager.to_device(src).reshape(byte_shape)


def gguf_tensor_bytes(
    tensor: ReaderTensor, device: torch.device | str, stager: DeviceStager | None = None
) -> torch.Tensor:
    """The raw GGML block data of one GGUF tensor on `device`: uint8 [..., row_bytes]
    (`gguf_byte_shape`), contiguous, in file order.

    Pass the load's `stager` to share its pinned buffers and progress bar (and overlap this copy
    with reading the next tensor); without one a stager is made for this call. On CUDA the copy
    may still be in flight on the current stream (kernels queued on it after this call see the
    data). On CPU the result is a private copy, safe to modify.
    """
    if stager is None:
        stager = DeviceStager(device)
    elif stager.device != normalize_device(device):
        raise ValueError(f"the stager copies to {stager.device}, not to {device}")
    raw = _staged_bytes(tensor, stager)
    return raw.clone() if raw.device.type == "cpu" else raw


def gguf_tensor_to_device(
    tensor: ReaderTensor, dtype: torch.dtype, stager: DeviceStager
) -> torch.Tensor:
    """The tensor's values in `dtype` on the stager's device, shape `gguf_value_shape`.

    F32/F16/BF16 and the Q*_0/1 and K formats are copied raw and converted / dequantized on
    the device (`ops/ggml_dequant.py`); the other formats (IQ*, TQ*, MXFP4), and on a CPU
    device all block formats, are dequantized on the CPU by the `gguf` package's numpy. On CPU the result may be a read-only view of
    the file mapping: the loaders copy it into the parameters and never write to it.
    """
    qtype = check_tensor_type(tensor.name, tensor.tensor_type)
    # On the CPU the gguf package's numpy dequantizes blocks faster than these torch ops (same
    # values, bit for bit); the float types are viewed in place there.
    on_device = stager.device.type != "cpu" or qtype in FLOAT_TYPES
    if qtype in TORCH_TYPES and on_device:
        return dequantize_raw(_staged_bytes(tensor, stager), qtype, dtype)
    values = dequantize_to_torch(tensor.name, tensor.data, tensor.tensor_type, dtype)
    stager.report(int(tensor.n_bytes))
    return values.to(stager.device)
