"""The paged-attention backend: planned once per step, then each layer only launches.

`PagedAttentionBackend` is built once per model runner with the model's attention shape. Each
step, `plan(metadata)` validates the metadata (once, not in every layer), decides whether the
CUDA kernels run (device, dtype, head dim and layout; `KESTREL_DISABLE_KERNELS` and
`KESTREL_PREFILL_KERNEL` are read when the backend is built), picks the number of decode splits
from the batch's `max_seq_len` (the real longest context in eager steps; a captured CUDA graph
plans for the longest context it serves) and hands out a split workspace the backend owns. The
kernels then cut each sequence by its real length (at most that many splits, none shorter
than MIN_SPLIT_TOKENS), so a graph serving a short context still spreads it over full splits. Every
attention layer then calls `ops.paged_attention(q, k_cache, v_cache, metadata, scale)`, which
follows the plan.

Workspaces are never freed while the backend lives: a captured graph keeps the pointer of the
one it was captured with (graphs are captured after a warm-up step, so capture allocates none).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from kestrel.ops import _dispatch, attention_cuda
from kestrel.ops.attention_cuda import PREFILL_KERNEL_ENV, SUPPORTED_HEAD_DIMS, prefill_variant_code
from kestrel.ops.attention_metadata import AttentionMetadata

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
    ) -> None:
        """`allocate_in_capture`: a one-off backend may allocate its workspace while a graph is
        captured (the graph's pool then owns it); a long-lived one must not (see _workspace)."""
        if num_q_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        self.num_q_heads = num_q_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.device = device
        # Chosen once: the kernels run for CUDA fp16/bf16 with a supported head dim.
        self.kernels = (
            device.type == "cuda"
            and _dispatch.kernels_available()
            and _dispatch.dtype_code(dtype) is not None
            and head_dim in SUPPORTED_HEAD_DIMS
        )
        self.prefill_variant = prefill_variant_code(os.environ.get(PREFILL_KERNEL_ENV, "auto"))
        self._probe = (
            torch.empty((1, num_q_heads, head_dim), dtype=dtype, device=device)
            if self.kernels
            else None
        )
        self._allocate_in_capture = allocate_in_capture
        self._workspaces: list[torch.Tensor] = []  # grow-only; all kept alive (graph pointers)

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
                self._probe, self.num_kv_heads, metadata.num_decodes, metadata.max_seq_len
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
    )
    return backend.decide(metadata)
