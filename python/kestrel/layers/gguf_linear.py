"""A linear layer whose weight stays in a GGUF block format (Q8_0, Q4_0, Q4_K, Q5_K, Q6_K).

`GGUFLinearMethod` holds the layer's weight as the file's raw blocks, one flat uint8 parameter
`weight`: each logical output part (q/k/v, gate/up; one part for plain layers) keeps its own
GGML type, and consecutive parts of one type form a segment, a row-major block matrix
[rows, row_bytes] starting on a 16-byte boundary of the buffer. Since blocks run along the input
dimension, a part's rows are whole file rows: the weight loader copies row slices (column- and
QKV-parallel shards) or, for row-parallel shards, whole-block column slices of the file tensor.

apply: on CUDA with the kernels, M <= GEMV_ROW_LIMIT rows run the fused dequantize-GEMV per
segment (8 rows per launch) straight into the output's columns; more rows dequantize every
segment into one [N, K] scratch in the activation dtype and take one cuBLAS matmul. Elsewhere (CPU, kernels off) the torch reference:
dequantize, then F.linear (fp32 on CPU).
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from kestrel.layers.linear import Device, LinearBase, LinearMethodBase, new_parameter
from kestrel.ops import _dispatch
from kestrel.ops import gguf as gguf_ops

_ALIGN = 16  # byte alignment of every segment in the flat weight buffer
# Up to this many rows the layer runs the fused GEMV (in launches of MAX_GEMV_ROWS rows, each
# re-reading the weight); above it, dequantize + one cuBLAS matmul. 8: one launch. Where the
# crossover lies for batched decode (9..64 rows) is for bench_gguf.py's chunked rows to say.
GEMV_ROW_LIMIT = gguf_ops.MAX_GEMV_ROWS


@dataclass(frozen=True)
class GGUFSegment:
    """Consecutive output rows of one GGML type: local rows [row_start, row_start + rows) of
    the layer, stored at weight[byte_offset : byte_offset + rows * row_bytes]."""

    qtype: GGMLQuantizationType
    row_start: int
    rows: int
    byte_offset: int
    row_bytes: int

    def view(self, weight: torch.Tensor) -> torch.Tensor:
        """The segment's raw blocks, uint8 [rows, row_bytes] (a view of the flat buffer)."""
        size = self.rows * self.row_bytes
        return weight[self.byte_offset : self.byte_offset + size].view(self.rows, self.row_bytes)


def plan_segments(
    part_types: Sequence[GGMLQuantizationType], part_rows: Sequence[int], k: int
) -> tuple[tuple[GGUFSegment, ...], int]:
    """Segments of the parts (consecutive parts of one type merged) and the buffer bytes."""
    segments: list[GGUFSegment] = []
    offset = row = 0
    for qtype, rows in zip(part_types, part_rows):
        if segments and segments[-1].qtype == qtype:
            last = segments[-1]
            segments[-1] = GGUFSegment(qtype, last.row_start, last.rows + rows, last.byte_offset,
                                       last.row_bytes)  # fmt: skip
        else:
            offset = -(-offset // _ALIGN) * _ALIGN
            segments.append(GGUFSegment(qtype, row, rows, offset, gguf_ops.row_bytes(qtype, k)))
        offset = segments[-1].byte_offset + segments[-1].rows * segments[-1].row_bytes
        row += rows
    return tuple(segments), offset


class GGUFLinearMethod(LinearMethodBase):
    """Raw GGUF blocks as the weight; `part_types`: the GGML type of each logical output part
    (the layer's output_partition_sizes, in order)."""

    def __init__(self, part_types: Sequence[GGMLQuantizationType]) -> None:
        self.part_types = tuple(GGMLQuantizationType(t) for t in part_types)
        for qtype in self.part_types:
            gguf_ops.block_size(qtype)  # ValueError naming the type and the supported ones

    def create_weights(
        self, layer: LinearBase, params_dtype: torch.dtype, device: Device, weight_loader: object
    ) -> None:
        parts = layer.output_partition_sizes
        if len(parts) != len(self.part_types):
            raise ValueError(
                f"{layer.prefix}: {len(self.part_types)} GGUF part types for "
                f"{len(parts)} output parts"
            )
        try:
            segments, nbytes = plan_segments(self.part_types, parts, layer.input_size_per_partition)
        except ValueError as exc:
            raise ValueError(f"{layer.prefix}: {exc}") from exc
        weight = new_parameter((nbytes,), torch.uint8, device)
        weight.output_dim = 0  # logical dims, for the layer's shard arithmetic
        weight.input_dim = 1
        weight.weight_loader = functools.partial(self._load_weight, layer)
        layer.register_parameter("weight", weight)
        layer.gguf_segments = segments
        layer.gguf_use_kernels = (
            _dispatch.kernels_for(device, params_dtype) and gguf_ops.gguf_kernels_usable()
        )

    # ---- loading --------------------------------------------------------------------------

    def _part_of(self, layer: LinearBase, param: torch.Tensor, shard_id: Hashable | None) -> int:
        """The output part a checkpoint tensor fills (the layer's shard check, exact types)."""
        if not layer.shard_ids:
            if shard_id is not None:
                raise ValueError(f"{layer._name(param)} has no shards; got shard_id={shard_id!r}")
            return 0
        for index, s in enumerate(layer.shard_ids):
            if type(shard_id) is type(s) and shard_id == s:
                return index
        raise ValueError(
            f"{layer._name(param)}: unknown shard {shard_id!r}; expected one of "
            f"{list(layer.shard_ids)}"
        )

    def _load_weight(
        self,
        layer: LinearBase,
        param: torch.Tensor,
        loaded: torch.Tensor,
        shard_id: Hashable | None = None,
        expert_id: int | None = None,
    ) -> None:
        """Copy this rank's rows (or whole-block columns) of a raw block tensor
        uint8 [rows, row_bytes] of the file into the part's segment."""
        name = layer._name(param, shard_id)
        if expert_id is not None:
            raise ValueError(f"{name}: expert_id={expert_id!r}, but no experts here")
        part = self._part_of(layer, param, shard_id)
        qtype = self.part_types[part]
        elems, block_bytes = gguf_ops.block_size(qtype)
        k = layer.input_size_per_partition
        part_rows = layer.output_partition_sizes[part]
        dst_row = sum(layer.output_partition_sizes[:part])
        src_rows, src_cols = slice(0, part_rows), slice(None)
        full_rows, full_k = part_rows, k
        where = layer._shard_slice(param, shard_id)
        if where is not None and where[0] == 0:  # output rows sharded
            _, src_start, dst_row, length, full_rows = where
            src_rows = slice(src_start, src_start + length)
        elif where is not None:  # input columns sharded (row-parallel): whole blocks only
            _, src_start, _, cols, full_k = where
            if src_start % elems or cols % elems:
                raise ValueError(
                    f"{name}: the input shard [{src_start}, {src_start + cols}) does not fall on "
                    f"{qtype.name} block boundaries ({elems} elements)"
                )
            src_cols = slice(
                src_start // elems * block_bytes, (src_start + cols) // elems * block_bytes
            )
        expected = (full_rows, full_k // elems * block_bytes)
        if loaded.dtype != torch.uint8 or tuple(loaded.shape) != expected:
            raise ValueError(
                f"{name}: expected raw {qtype.name} blocks uint8 {expected}; got "
                f"{loaded.dtype} of shape {tuple(loaded.shape)}"
            )
        rows = src_rows.stop - src_rows.start
        segment = next(
            s for s in layer.gguf_segments if s.row_start <= dst_row < s.row_start + s.rows
        )
        start = dst_row - segment.row_start
        segment.view(param.data)[start : start + rows].copy_(loaded[src_rows, src_cols])

    # ---- compute --------------------------------------------------------------------------

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # x [T, K] -> [T, N]
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        if layer.gguf_use_kernels and x.is_cuda:
            if _dispatch.dtype_code(x.dtype) is not None and gguf_ops.gguf_kernels_usable():
                out = self._apply_kernels(layer, x2, bias)
                return out.reshape(*lead, out.shape[-1])
            _dispatch.reference_fallback("gguf_linear", f"x {x.dtype}")
        out = self._apply_reference(layer, x2, bias)
        return out.reshape(*lead, out.shape[-1])

    def _apply_reference(
        self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        compute = x.dtype if x.is_cuda else torch.float32
        w = torch.cat(
            [gguf_ops.dequantize_reference(s.view(layer.weight), s.qtype, compute)
             for s in layer.gguf_segments]
        )  # fmt: skip
        b = None if bias is None else bias.to(compute)
        return F.linear(x.to(compute), w, b).to(x.dtype)

    def _apply_kernels(
        self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        m, n = x.shape[0], layer.output_size_per_partition
        segments = layer.gguf_segments
        if m == 0:
            return x.new_empty((0, n))
        if m <= GEMV_ROW_LIMIT:
            return gemv_segments(x, layer.weight, segments, n, bias)
        w = torch.empty((n, x.shape[1]), dtype=x.dtype, device=x.device)  # scratch [N, K]
        for s in segments:
            rows = w[s.row_start : s.row_start + s.rows]
            gguf_ops.gguf_dequantize(s.view(layer.weight), s.qtype, x.dtype, out=rows)
        return F.linear(x, w, bias)


def gemv_segments(
    x: torch.Tensor,
    weight: torch.Tensor,
    segments: Sequence[GGUFSegment],
    n: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] @ W^T through the fused GEMV: per segment, per 8 rows of x, one launch writing
    the segment's output columns. Returns [M, n] (+ bias)."""
    m = x.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    step = gguf_ops.MAX_GEMV_ROWS
    for s in segments:
        blocks = s.view(weight)
        for r in range(0, m, step):
            cols = out[r : r + step, s.row_start : s.row_start + s.rows]
            gguf_ops.gguf_gemv(x[r : r + step], blocks, s.qtype, out=cols)
    return out if bias is None else out.add_(bias)


def gguf_weight_bytes(module: torch.nn.Module) -> dict[str, int]:
    """Bytes of GGUF raw-block weights per GGML type name over a model's linear layers."""
    totals: dict[str, int] = {}
    for layer in module.modules():
        for s in getattr(layer, "gguf_segments", ()):
            totals[s.qtype.name] = totals.get(s.qtype.name, 0) + s.rows * s.row_bytes
    return totals
