"""Linear projections: tensor-parallel shard layouts over a pluggable (quantization) method.

A layer holds a `quant_method` (a `LinearMethodBase`) that creates its weight parameters,
post-processes them once loaded and runs the matmul; `UnquantizedLinearMethod` is plain
`F.linear`. The layer owns the parallel layout: which slice of the full (checkpoint) tensor this
rank holds and which collective follows the matmul. At tensor-parallel size 1 every layer does
exactly one `F.linear(x, weight, bias)`: the collectives are Python early returns.

Weight loader protocol: every parameter carries `weight_loader(param, loaded_weight,
shard_id=None, expert_id=None)`, which takes the FULL checkpoint tensor (all ranks' rows) and
copies this rank's shard into `param`. A parameter fused from several checkpoint tensors (q/k/v,
gate/up) also carries `shard_ids`, the shards that must all be loaded before it is complete; the
model's `packed_modules_mapping` lists the checkpoint modules in the same order. Loader errors
are ValueErrors naming the parameter (the layer's `prefix` + ".weight" / ".bias").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kestrel.layers import dense_gemv_linear
from kestrel.layers.parallel import SINGLE_RANK, TensorParallelGroup, divide

Device = torch.device | str | None


def new_parameter(shape: Sequence[int], dtype: torch.dtype, device: Device) -> nn.Parameter:
    """Uninitialized inference-only parameter (filled by a loader or dummy init)."""
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


def default_weight_loader(
    param: torch.Tensor,
    loaded_weight: torch.Tensor,
    shard_id: Hashable | None = None,
    expert_id: int | None = None,
) -> None:
    """Copy a whole (replicated) checkpoint tensor into `param`, converting dtype and device."""
    if shard_id is not None or expert_id is not None:
        raise ValueError(
            f"this parameter has no shards or experts; got shard_id={shard_id!r}, "
            f"expert_id={expert_id!r}"
        )
    if tuple(loaded_weight.shape) != tuple(param.shape):
        raise ValueError(
            f"shape mismatch: checkpoint tensor {tuple(loaded_weight.shape)}, "
            f"parameter {tuple(param.shape)}"
        )
    param.data.copy_(loaded_weight)


class LinearMethodBase(ABC):
    """How a linear layer stores its weight and computes x @ W^T (+ bias).

    The seam for quantization: a quantized method registers its own parameters (packed weights,
    scales) with `weight_loader`, `input_dim` and `output_dim` attributes, may repack them in
    `process_weights_after_loading`, and runs its kernel in `apply`.
    """

    @abstractmethod
    def create_weights(
        self, layer: LinearBase, params_dtype: torch.dtype, device: Device, weight_loader: object
    ) -> None:
        """Register on `layer` the weight parameter(s) of this rank's shard; the sizes are the
        layer's (input_size_per_partition, output_partition_sizes, input_size, output_size)."""

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        """Called once after every checkpoint tensor was loaded (default: nothing to do)."""

    @abstractmethod
    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [num_tokens, input_size_per_partition] -> [num_tokens, output_size_per_partition]."""


class UnquantizedLinearMethod(LinearMethodBase):
    """weight [sum(output_partition_sizes), input_size_per_partition] in the model dtype."""

    def create_weights(
        self, layer: LinearBase, params_dtype: torch.dtype, device: Device, weight_loader: object
    ) -> None:
        shape = (layer.output_size_per_partition, layer.input_size_per_partition)
        weight = new_parameter(shape, params_dtype, device)
        weight.input_dim = 1
        weight.output_dim = 0
        weight.weight_loader = weight_loader
        layer.register_parameter("weight", weight)
        # M <= 8 rows: the skinny GEMM kernel (layers/dense_gemv_linear.py; None: F.linear only)
        layer.gemv_dtype = dense_gemv_linear.gemv_dtype(
            device, params_dtype, layer.input_size_per_partition, fp8=False
        )

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if getattr(layer, "gemv_dtype", None) is not None:  # decode rows: the GEMV if it fits
            out = dense_gemv_linear.run_gemv(layer, x, layer.weight, None, bias)
            if out is not None:
                return out
        return F.linear(x, layer.weight, bias)


def process_weights_after_loading(model: nn.Module) -> None:
    """Let every layer's quant method finish its weights; call once, after loading. On CUDA
    the memory of the tensors they replaced goes back to the card (so that the KV-cache
    planner, which reads the card's free memory, sees it)."""
    repacked = False
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, LinearMethodBase) and isinstance(module, LinearBase):
            method.process_weights_after_loading(module)
            repacked |= not isinstance(method, UnquantizedLinearMethod)
    if repacked and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


# A shard copy: param.narrow(dim, dst_start, length) <- loaded.narrow(dim, src_start, length),
# where `loaded` has `full_size` rows along `dim` (param's sizes elsewhere). None: the parameter
# is replicated and `loaded` is copied whole.
ShardSlice = tuple[int, int, int, int, int]  # (dim, src_start, dst_start, length, full_size)


class LinearBase(nn.Module):
    """A linear layer's sizes, parallel group, quant method and (optional) bias.

    input_size / output_size: the full (unsharded) sizes; input_size_per_partition and
    output_partition_sizes: this rank's (the logical parts of the output, e.g. q, k, v).
    bias: [output_size_per_partition] if `bias_sharded` (column forms), else [output_size]
    replicated. Subclasses say where a checkpoint tensor's shard goes (`_shard_slice`).
    """

    shard_ids: tuple[Hashable, ...] = ()  # packed layers: the shards of every parameter

    def __init__(
        self,
        input_size: int,
        output_size: int,
        input_size_per_partition: int,
        output_partition_sizes: Sequence[int],
        *,
        bias: bool,
        bias_sharded: bool,
        tp_group: TensorParallelGroup,
        quant_method: LinearMethodBase | None,
        dtype: torch.dtype,
        device: Device,
        prefix: str,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.input_size_per_partition = input_size_per_partition
        self.output_partition_sizes = list(output_partition_sizes)
        self.output_size_per_partition = sum(self.output_partition_sizes)
        self.tp_group = tp_group
        self.prefix = prefix
        self.quant_method = quant_method if quant_method is not None else UnquantizedLinearMethod()
        self.weight: nn.Parameter
        self.quant_method.create_weights(self, dtype, device, weight_loader=self.weight_loader)
        if bias:
            rows = self.output_size_per_partition if bias_sharded else output_size
            self.bias: nn.Parameter | None = new_parameter((rows,), dtype, device)
            self.bias.output_dim = 0 if bias_sharded else None
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def _set_shard_ids(self, shard_ids: tuple[Hashable, ...]) -> None:
        self.shard_ids = shard_ids
        for param in self.parameters(recurse=False):
            param.shard_ids = shard_ids  # the loader's completeness check reads this

    def weight_loader(
        self,
        param: torch.Tensor,
        loaded_weight: torch.Tensor,
        shard_id: Hashable | None = None,
        expert_id: int | None = None,
    ) -> None:
        """Copy this rank's shard of the full checkpoint tensor `loaded_weight` into `param`."""
        if expert_id is not None:
            raise ValueError(f"{self._name(param)}: expert_id={expert_id!r}, but no experts here")
        if not self.shard_ids and shard_id is not None:
            raise ValueError(f"{self._name(param)} has no shards; got shard_id={shard_id!r}")
        if self.shard_ids and not any(  # exact: True is not shard 1, nor 1.0
            type(shard_id) is type(s) and shard_id == s for s in self.shard_ids
        ):
            raise ValueError(
                f"{self._name(param)}: unknown shard {shard_id!r}; expected one of "
                f"{list(self.shard_ids)}"
            )
        where = self._shard_slice(param, shard_id)
        expected = list(param.shape)
        if where is not None:
            expected[where[0]] = where[4]
        if list(loaded_weight.shape) != expected:
            raise ValueError(
                f"{self._name(param, shard_id)}: shape mismatch: checkpoint tensor "
                f"{tuple(loaded_weight.shape)}, expected {tuple(expected)}"
            )
        if where is None:
            param.data.copy_(loaded_weight)
        else:
            dim, src_start, dst_start, length, _ = where
            target = param.data.narrow(dim, dst_start, length)
            target.copy_(loaded_weight.narrow(dim, src_start, length))

    def _shard_slice(self, param: torch.Tensor, shard_id: Hashable | None) -> ShardSlice | None:
        """Where `param`'s slice of the checkpoint tensor (shard `shard_id`) comes from; the
        default, None, is a replicated parameter (copied whole)."""
        return None

    def _name(self, param: torch.Tensor, shard_id: Hashable | None = None) -> str:
        """The parameter's name (prefix.weight / prefix.bias) and shard, for error messages."""
        local = next((n for n, p in self.named_parameters(recurse=False) if p is param), "?")
        name = f"{self.prefix}.{local}" if self.prefix else local
        return name if shard_id is None else f"{name} (shard {shard_id!r})"


def _rows(
    param: torch.Tensor, tp_group: TensorParallelGroup, offset: int, rows: int
) -> ShardSlice | None:
    """Rank r's `rows` output rows (of a part split evenly over the ranks) go to rows
    [offset, offset + rows) of `param`; None for a parameter without an output dim."""
    dim = getattr(param, "output_dim", None)
    if dim is None:
        return None  # replicated (e.g. a per-tensor scale of a quantized weight)
    return (dim, tp_group.rank * rows, offset, rows, rows * tp_group.size)


class ReplicatedLinear(LinearBase):
    """Every rank holds the whole weight [output_size, input_size]; no communication."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        bias: bool,
        dtype: torch.dtype = torch.float32,
        device: Device = None,
        tp_group: TensorParallelGroup = SINGLE_RANK,
        quant_method: LinearMethodBase | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__(
            input_size, output_size, input_size, [output_size], bias=bias, bias_sharded=False,
            tp_group=tp_group, quant_method=quant_method, dtype=dtype, device=device,
            prefix=prefix,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [num_tokens, input_size] -> [num_tokens, output_size]
        return self.quant_method.apply(self, x, self.bias)


class ColumnParallelLinear(LinearBase):
    """Output rows sharded: rank r holds rows [r * O/tp, (r + 1) * O/tp) of weight [O, I] and
    of the bias. The output is this rank's columns [T, O/tp], or all of them [T, O] with
    `gather_output` (an all-gather, rank order). Packed subclasses pass their per-rank
    logical parts as `output_partition_sizes` instead of [O/tp]."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        bias: bool,
        gather_output: bool = False,
        dtype: torch.dtype = torch.float32,
        device: Device = None,
        tp_group: TensorParallelGroup = SINGLE_RANK,
        quant_method: LinearMethodBase | None = None,
        prefix: str = "",
        output_partition_sizes: Sequence[int] | None = None,
    ) -> None:
        if output_partition_sizes is None:
            output_partition_sizes = [divide(output_size, tp_group.size, f"{prefix} output_size")]
        super().__init__(
            input_size, output_size, input_size, output_partition_sizes, bias=bias,
            bias_sharded=True, tp_group=tp_group, quant_method=quant_method, dtype=dtype,
            device=device, prefix=prefix,
        )  # fmt: skip
        self.gather_output = gather_output

    def _shard_slice(self, param: torch.Tensor, shard_id: Hashable | None) -> ShardSlice | None:
        return _rows(param, self.tp_group, 0, self.output_size_per_partition)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [num_tokens, input_size] -> [num_tokens, output_size_per_partition]
        out = self.quant_method.apply(self, x, self.bias)
        if self.gather_output:
            out = self.tp_group.all_gather(out, dim=-1)  # [num_tokens, output_size]
        return out


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input in one matmul (gate/up).

    Per rank the output is the parts' shards concatenated: for output_sizes [G, U] it is
    [T, G/tp + U/tp], gate columns first. Shard ids are the part indices 0, 1, ... (the order
    of the model's packed_modules_mapping entry); checkpoint tensors are whole parts [G, I].
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: Sequence[int],
        *,
        bias: bool,
        dtype: torch.dtype = torch.float32,
        device: Device = None,
        tp_group: TensorParallelGroup = SINGLE_RANK,
        quant_method: LinearMethodBase | None = None,
        prefix: str = "",
    ) -> None:
        parts = [
            divide(size, tp_group.size, f"{prefix} output_sizes[{i}]")
            for i, size in enumerate(output_sizes)
        ]
        super().__init__(
            input_size, sum(output_sizes), bias=bias, dtype=dtype, device=device,
            tp_group=tp_group, quant_method=quant_method, prefix=prefix,
            output_partition_sizes=parts,
        )  # fmt: skip
        self.output_sizes = list(output_sizes)
        self._set_shard_ids(tuple(range(len(parts))))

    def _shard_slice(self, param: torch.Tensor, shard_id: Hashable | None) -> ShardSlice | None:
        assert isinstance(shard_id, int)
        offset = sum(self.output_partition_sizes[:shard_id])  # the part's first row here
        return _rows(param, self.tp_group, offset, self.output_partition_sizes[shard_id])


class QKVParallelLinear(ColumnParallelLinear):
    """The fused q/k/v projection, sharded by attention head.

    Rank r holds q heads [r * Hq/tp, (r + 1) * Hq/tp) and Hkv/tp k and v heads; when
    Hkv < tp, each KV head is replicated on tp/Hkv consecutive ranks (rank r holds KV head
    r // (tp/Hkv)). Per-rank output [T, (num_heads + 2 * num_kv_heads) * head_dim]: q, then
    k, then v. Shard ids "q", "k", "v"; checkpoint tensors [H * head_dim, hidden] (all H heads).
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        total_num_heads: int,
        total_num_kv_heads: int,
        *,
        bias: bool,
        dtype: torch.dtype = torch.float32,
        device: Device = None,
        tp_group: TensorParallelGroup = SINGLE_RANK,
        quant_method: LinearMethodBase | None = None,
        prefix: str = "",
    ) -> None:
        tp = tp_group.size
        num_heads = divide(total_num_heads, tp, f"{prefix} num_attention_heads")
        if tp >= total_num_kv_heads:
            if tp % total_num_kv_heads != 0:
                raise ValueError(
                    f"{prefix} num_key_value_heads={total_num_kv_heads}: the tensor-parallel "
                    f"size {tp} must be a multiple of it (to replicate each KV head evenly)"
                )
            num_kv_heads, replicas = 1, tp // total_num_kv_heads
        else:
            num_kv_heads = divide(total_num_kv_heads, tp, f"{prefix} num_key_value_heads")
            replicas = 1
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        super().__init__(
            hidden_size, (total_num_heads + 2 * total_num_kv_heads) * head_dim, bias=bias,
            dtype=dtype, device=device, tp_group=tp_group, quant_method=quant_method,
            prefix=prefix, output_partition_sizes=[q_size, kv_size, kv_size],
        )  # fmt: skip
        self.head_dim = head_dim
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads
        self.num_heads = num_heads  # q heads on this rank
        self.num_kv_heads = num_kv_heads  # k (and v) heads on this rank
        self.num_kv_head_replicas = replicas  # ranks holding each KV head
        self.q_size = q_size  # this rank's q columns
        self.kv_size = kv_size  # this rank's k (and v) columns
        self._set_shard_ids(("q", "k", "v"))

    def _shard_slice(self, param: torch.Tensor, shard_id: Hashable | None) -> ShardSlice | None:
        rank = self.tp_group.rank
        if shard_id == "q":
            full = self.total_num_heads * self.head_dim
            return (param.output_dim, rank * self.q_size, 0, self.q_size, full)
        kv_rank = rank // self.num_kv_head_replicas  # the KV head group this rank holds
        offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
        full = self.total_num_kv_heads * self.head_dim
        return (param.output_dim, kv_rank * self.kv_size, offset, self.kv_size, full)


class RowParallelLinear(LinearBase):
    """Input columns sharded: rank r holds columns [r * I/tp, (r + 1) * I/tp) of weight [O, I].
    The bias [O] is replicated and added by rank 0 only, so the sum over ranks (the all-reduce,
    or the caller's with `reduce_results=False`) adds it once.

    `input_is_parallel`: x is already this rank's slice [T, I/tp] (a column layer's output);
    otherwise x is [T, I] and the layer takes its slice.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        bias: bool,
        input_is_parallel: bool = True,
        reduce_results: bool = True,
        dtype: torch.dtype = torch.float32,
        device: Device = None,
        tp_group: TensorParallelGroup = SINGLE_RANK,
        quant_method: LinearMethodBase | None = None,
        prefix: str = "",
    ) -> None:
        per_rank = divide(input_size, tp_group.size, f"{prefix} input_size")
        super().__init__(
            input_size, output_size, per_rank, [output_size], bias=bias, bias_sharded=False,
            tp_group=tp_group, quant_method=quant_method, dtype=dtype, device=device,
            prefix=prefix,
        )  # fmt: skip
        self.input_is_parallel = input_is_parallel
        self.reduce_results = reduce_results

    def _shard_slice(self, param: torch.Tensor, shard_id: Hashable | None) -> ShardSlice | None:
        dim = getattr(param, "input_dim", None)
        if dim is None:
            return None  # the replicated bias
        cols = self.input_size_per_partition
        return (dim, self.tp_group.rank * cols, 0, cols, self.input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [num_tokens, input_size_per_partition] (or [num_tokens, input_size] when not
        # input_is_parallel) -> [num_tokens, output_size], summed over ranks if reduce_results
        tp = self.tp_group
        if not self.input_is_parallel and tp.size > 1:
            cols = self.input_size_per_partition
            x = x.narrow(-1, tp.rank * cols, cols)
        bias = self.bias if tp.rank == 0 else None
        out = self.quant_method.apply(self, x, bias)
        if self.reduce_results:
            out = tp.all_reduce(out)
        return out
