"""A safetensors file as byte ranges of one memory mapping (for `DeviceStager`).

The format (huggingface/safetensors README): an 8-byte little-endian header length N, N bytes of
JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the
data; offsets count from the first byte after the header. The `safetensors` library reads
tensors but does not expose where they lie, which the staged copy to the device needs, so the
header is parsed here and every entry is checked against the file before any byte is read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors dtype names -> torch dtypes.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER_BYTES = 100 << 20  # the reference implementation's limit


@dataclass(frozen=True)
class SafetensorsEntry:
    """One tensor: its dtype, shape and absolute byte range [start, end) in the file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def num_bytes(self) -> int:
        return self.end - self.start


class SafetensorsFile:
    """A parsed, checked safetensors file and a private (copy-on-write) mapping of it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError(f"{self.path} is not a safetensors file ({size} bytes)")
            header_len = int.from_bytes(prefix, "little")
            if header_len > min(_MAX_HEADER_BYTES, size - 8):
                raise ValueError(
                    f"{self.path}: header length {header_len} exceeds the file "
                    f"({size} bytes) or {_MAX_HEADER_BYTES} bytes; not a safetensors file?"
                )
            raw_header = f.read(header_len)
        try:
            header = json.loads(raw_header)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{self.path}: header is not valid JSON: {exc}") from exc
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: header must be a JSON object")  # noqa: TRY004
        self.metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + header_len
        entries = [self._entry(name, info, data_start, size) for name, info in header.items()]
        self.entries = sorted(entries, key=lambda e: e.start)  # file order: sequential reads
        self._mapping = (
            torch.from_file(str(self.path), shared=False, size=size, dtype=torch.uint8)
            if size > data_start
            else torch.empty(0, dtype=torch.uint8)
        )

    def _entry(self, name: str, info: object, data_start: int, size: int) -> SafetensorsEntry:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(info, dict) or {"dtype", "shape", "data_offsets"} - info.keys():
            raise ValueError(f"{where}: entry must have dtype, shape and data_offsets")
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(
                f"{where}: dtype {info['dtype']!r} is not supported; supported: "
                f"{', '.join(SAFETENSORS_DTYPES)}"
            )
        shape, offsets = info["shape"], info["data_offsets"]
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ValueError(f"{where}: shape {shape!r} must be a list of integers >= 0")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise ValueError(
                f"{where}: data_offsets {offsets!r} must be [begin, end], 0<=begin<=end"
            )
        start, end = data_start + offsets[0], data_start + offsets[1]
        expected = math.prod(shape) * dtype.itemsize
        if end - start != expected:
            raise ValueError(
                f"{where}: {end - start} data bytes, but shape {shape} of {info['dtype']} needs "
                f"{expected}"
            )
        if end > size:
            raise ValueError(
                f"{self.path} is truncated: tensor {name!r} ends at byte {end} but the file has "
                f"{size} bytes"
            )
        return SafetensorsEntry(name, dtype, tuple(shape), start, end)

    def raw(self, entry: SafetensorsEntry) -> torch.Tensor:
        """The entry's bytes: a flat CPU uint8 view of the mapping (copy-on-write, no copy)."""
        return self._mapping[entry.start : entry.end]

    @property
    def num_bytes(self) -> int:
        return sum(e.num_bytes for e in self.entries)


def as_typed(raw: torch.Tensor, entry: SafetensorsEntry) -> torch.Tensor:
    """Reinterpret the entry's raw bytes (on any device) as its dtype and shape. A range that
    is not aligned to the dtype (possible in a file, never in a fresh device buffer) is copied
    first."""
    if raw.numel() == 0:
        return torch.empty(entry.shape, dtype=entry.dtype, device=raw.device)
    if raw.data_ptr() % entry.dtype.itemsize != 0:
        raw = raw.clone()
    return raw.view(entry.dtype).reshape(entry.shape)
