"""The paged-attention backend: planned once per step, then each layer only launches.

`PagedAttentionBackend` is built once per model runner with the model's attention shape. Each
step, `plan(metadata)` validates the metadata (once, not in every layer), decides whether the
CUDA kernels run (device, dtype, head dim and layout; the `KESTREL_DISABLE_KERNELS` and
`KESTREL_PREFILL_KERNEL` settings, read once in `_dispatch.settings`, apply when the backend is
built), picks the number of decode splits
from the batch's `max_seq_len` (the real longest context in eager steps; a captured CUDA graph
plans for the longest context it serves) and hands out a split workspace the backend owns. The
kernels then cut each sequence by its real length (at most that many splits, none shorter
than MIN_SPLIT_TOKENS), so a graph serving a short context still spreads it over full splits. Every
attention layer then calls `ops.paged_attention(q, k_cache, v_cache, metadata, scale)`, which
follows the plan.

Workspaces are never freed while the backend lives: a captured graph keeps the pointer of the
one it was captured with (graphs are captured after a warm-up step, so capture allocates none).

CUDA-graph hooks (used by `kestrel.runner.cuda_graphs.DecodeGraphs`): `init_graph_buffers`
allocates the static metadata tensors a decode graph reads (slot mapping, context lengths,
query offsets, block tables); `capture_metadata(bs, max_seq_len)` is the planned metadata over
their first bs rows, made once per captured size; `prepare_replay(step, bs, stage)` copies a
decode-only step into them before a replay and pads rows n..bs (slot -1: no KV write; context
length 1 over block 0: attention reads valid memory).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from kestrel.ops import _dispatch, attention_cuda
from kestrel.ops.attention_cuda import SUPPORTED_HEAD_DIMS, prefill_variant_code
from kestrel.ops.attention_metadata import AttentionMetadata
from kestrel.ops.kv_quant import is_fp8

if TYPE_CHECKING:
    from kestrel.executor.step_input import StepInput

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttentionPlan:
    """What every attention layer of one step does (see the module docstring)."""

    block_size: int
    use_kernels: bool  # False: the torch reference
    # Decode grid splits per sequence (planned for metadata.max_seq_len); 1 when there are no
    # decodes or no kernels. Sequence i uses max(decode_min_split_len, ceil(seq_len_i /
    # decode_splits)) tokens per split, computed by the kernels from its real length.
    decode_splits: int
    decode_min_split_len: int
    prefill_variant: int  # launcher code: 0 auto, 1 mma.sync, 2 wgmma
    workspace: torch.Tensor | None  # [>= splits * decodes * Hq * (D + 1)] fp32 when splits > 1


@dataclass(frozen=True)
class GraphBuffers:
    """Static decode-graph metadata on the device (a captured graph reads these addresses)."""

    slot_mapping: torch.Tensor  # [max_bs] int64; -1 on padding rows
    seq_lens: torch.Tensor  # [max_bs] int32; 1 on padding rows
    query_start_loc: torch.Tensor  # [max_bs + 1] int32; 0, 1, ..., max_bs
    block_tables: torch.Tensor  # [max_bs, max_blocks] int32; block 0 first on padding rows

    @property
    def max_bs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def max_blocks(self) -> int:
        return int(self.block_tables.shape[1])


class PagedAttentionBackend:
    def __init__(
        self,
        *,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        allocate_in_capture: bool = False,
        kv_cache_dtype: torch.dtype | None = None,
    ) -> None:
        """`allocate_in_capture`: a one-off backend may allocate its workspace while a graph is
        captured (the graph's pool then owns it); a long-lived one must not (see _workspace).
        `kv_cache_dtype`: the caches' element type (default: dtype; or float8 e4m3)."""
        if num_q_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        self.num_q_heads = num_q_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.device = device
        self.kv_cache_dtype = dtype if kv_cache_dtype is None else kv_cache_dtype
        # Chosen once: the kernels run for CUDA fp16/bf16 with a supported head dim, over
        # caches of that dtype or float8 e4m3.
        self.kernels = (
            device.type == "cuda"
            and _dispatch.kernels_available()
            and _dispatch.dtype_code(dtype) is not None
            and attention_cuda.kv_dtype_code(dtype, self.kv_cache_dtype) is not None
            and head_dim in SUPPORTED_HEAD_DIMS
            and (not is_fp8(self.kv_cache_dtype) or _dispatch.kernel_verified(_dispatch.FP8_KV_OP))
        )
        self.prefill_variant = prefill_variant_code(_dispatch.settings.prefill_kernel)
        self._probe = (
            torch.empty((1, num_q_heads, head_dim), dtype=dtype, device=device)
            if self.kernels
            else None
        )
        self._allocate_in_capture = allocate_in_capture
        self._workspaces: list[torch.Tensor] = []  # grow-only; all kept alive (graph pointers)
        self._graph: GraphBuffers | None = None  # see init_graph_buffers
        self._graph_metadata: dict[tuple[int, int], AttentionMetadata] = {}

    def metadata_for(
        self, out: StepInput, stage: Callable[[np.ndarray], torch.Tensor]
    ) -> AttentionMetadata:
        """The one builder of a step's metadata from a StepInput: its arrays staged to the
        device with `stage` (one copy each), then planned."""
        metadata = AttentionMetadata(
            slot_mapping=stage(out.slot_mapping),
            query_start_loc=stage(out.query_start_loc),
            seq_lens=stage(out.seq_lens),
            block_tables=stage(out.block_tables),
            num_decodes=out.num_decodes,
            num_decode_tokens=out.num_decodes,
            max_query_len=out.max_query_len,
            max_seq_len=out.max_seq_len,
            query_start_loc_cpu=torch.from_numpy(out.query_start_loc),
            seq_lens_cpu=torch.from_numpy(out.seq_lens),
        )
        return self.plan(metadata)

    def plan(self, metadata: AttentionMetadata) -> AttentionMetadata:
        """The metadata with this step's plan attached (validated here, once)."""
        metadata.validate(block_size=self.block_size)
        return dataclasses.replace(metadata, plan=self.decide(metadata))

    def decide(self, metadata: AttentionMetadata) -> AttentionPlan:
        """The plan for already validated metadata."""
        splits, workspace = 1, None
        if self.kernels and metadata.num_decodes > 0:
            assert self._probe is not None
            splits = attention_cuda.decode_plan(
                self._probe,
                self.num_kv_heads,
                metadata.num_decodes,
                metadata.max_seq_len,
                self.kv_cache_dtype,
            )
            if splits > 1:
                floats = splits * metadata.num_decodes * self.num_q_heads * (self.head_dim + 1)
                workspace = self._workspace(floats)
        return AttentionPlan(
            block_size=self.block_size,
            use_kernels=self.kernels,
            decode_splits=splits,
            decode_min_split_len=attention_cuda.MIN_SPLIT_TOKENS,
            prefill_variant=self.prefill_variant,
            workspace=workspace,
        )

    # ---- CUDA-graph hooks -----------------------------------------------------------------

    def init_graph_buffers(self, max_bs: int, max_blocks: int) -> None:
        """Allocates the static metadata buffers of decode graphs for up to max_bs sequences
        of up to max_blocks KV blocks each (on the backend's device); drops earlier ones and
        the metadata planned over them."""
        if max_bs < 1 or max_blocks < 1:
            raise ValueError(f"need max_bs >= 1 and max_blocks >= 1; got {max_bs}, {max_blocks}")
        i64 = {"dtype": torch.int64, "device": self.device}
        i32 = {"dtype": torch.int32, "device": self.device}
        self._graph = GraphBuffers(
            slot_mapping=torch.full((max_bs,), -1, **i64),
            seq_lens=torch.ones(max_bs, **i32),
            query_start_loc=torch.arange(max_bs + 1, **i32),  # one query per row, never changes
            block_tables=torch.zeros(max_bs, max_blocks, **i32),
        )
        self._graph_metadata = {}

    def _graph_buffers(self) -> GraphBuffers:
        if self._graph is None:
            raise RuntimeError("call init_graph_buffers() before capturing or replaying a graph")
        return self._graph

    def capture_metadata(self, bs: int, max_seq_len: int) -> AttentionMetadata:
        """The planned metadata a decode graph of bs sequences is captured with: views of the
        first bs rows of the static buffers, planned for contexts up to max_seq_len (the
        plan's splits and workspace are baked into the graph; the kernels cut each row by its
        real seq_len at replay). Planned once per (bs, max_seq_len) and then returned as is, so
        warm-up runs and the capture share one plan and workspace."""
        key = (bs, max_seq_len)
        cached = self._graph_metadata.get(key)
        if cached is not None:
            return cached
        g = self._graph_buffers()
        if not 1 <= bs <= g.max_bs:
            raise ValueError(f"graph batch size {bs} is outside [1, {g.max_bs}]")
        metadata = AttentionMetadata(
            slot_mapping=g.slot_mapping[:bs],
            query_start_loc=g.query_start_loc[: bs + 1],
            seq_lens=g.seq_lens[:bs],
            block_tables=g.block_tables[:bs],
            num_decodes=bs,
            num_decode_tokens=bs,
            max_query_len=1,
            max_seq_len=max_seq_len,
            query_start_loc_cpu=torch.arange(bs + 1, dtype=torch.int32),
            # Shape-defining host copy: the longest context the graph must serve.
            seq_lens_cpu=torch.full((bs,), max_seq_len, dtype=torch.int32),
        )
        planned = self.plan(metadata)
        self._graph_metadata[key] = planned
        return planned

    def prepare_replay(
        self, step: StepInput, bs: int, stage: Callable[[np.ndarray], torch.Tensor]
    ) -> None:
        """Copies the metadata arrays of a decode-only step of n <= bs requests into the
        static buffers (one non-blocking copy each, staged with `stage`) and pads rows n..bs:
        slot -1 (no KV write), seq_len 1 over block 0 (valid memory to read). Rows past bs
        are left as they are (the bs graph does not read them)."""
        g = self._graph_buffers()
        n, width = step.num_reqs, step.max_blocks_per_seq
        if not (0 < n <= bs <= g.max_bs and step.num_decodes == n and width <= g.max_blocks):
            raise ValueError(
                f"a graph replay needs 0 < decodes == requests <= bs <= {g.max_bs} and at most "
                f"{g.max_blocks} blocks per sequence; got {step.num_decodes} decodes of "
                f"{n} requests, bs {bs}, {width} blocks"
            )
        g.slot_mapping[:n].copy_(stage(step.slot_mapping), non_blocking=True)
        g.seq_lens[:n].copy_(stage(step.seq_lens), non_blocking=True)
        g.block_tables[:n, :width].copy_(stage(step.block_tables), non_blocking=True)
        if bs > n:
            g.slot_mapping[n:bs].fill_(-1)
            g.seq_lens[n:bs].fill_(1)
            g.block_tables[n:bs, 0].fill_(0)

    # ---- workspace ------------------------------------------------------------------------

    def _workspace(self, floats: int) -> torch.Tensor:
        if self._workspaces and self._workspaces[-1].numel() >= floats:
            return self._workspaces[-1]
        if not self._allocate_in_capture and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "paged attention: a split workspace must be allocated during CUDA graph capture; "
                "run one eager step of the same shape first"
            )
        buf = torch.empty(floats, dtype=torch.float32, device=self.device)
        self._workspaces.append(buf)
        return buf


def ad_hoc_plan(
    q: torch.Tensor, key_cache: torch.Tensor, metadata: AttentionMetadata
) -> AttentionPlan:
    """A plan for metadata built by hand (tests, benchmarks, one-off calls), made by a backend
    for these shapes built now (environment read now, a workspace of its own). The caller has
    validated the metadata. Shapes no backend takes get a reference plan: the reference's
    argument checks then name what is wrong."""
    if q.dim() != 3 or key_cache.dim() != 4 or q.shape[1] % key_cache.shape[2] != 0:
        block_size = key_cache.shape[1] if key_cache.dim() == 4 else 0
        return AttentionPlan(
            block_size=block_size,
            use_kernels=False,
            decode_splits=1,
            decode_min_split_len=attention_cuda.MIN_SPLIT_TOKENS,
            prefill_variant=0,
            workspace=None,
        )
    backend = PagedAttentionBackend(
        num_q_heads=q.shape[1],
        num_kv_heads=key_cache.shape[2],
        head_dim=q.shape[2],
        block_size=key_cache.shape[1],
        dtype=q.dtype,
        device=q.device,
        allocate_in_capture=True,
        kv_cache_dtype=key_cache.dtype,
    )
    return backend.decide(metadata)
