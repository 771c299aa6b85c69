"""AttentionMetadata: the per-step batch context every attention layer reads (the layout of the
query rows and of the paged KV cache is described in `kestrel.ops.attention`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kestrel.ops.attention_backend import AttentionPlan


@dataclass
class AttentionMetadata:
    """Per-step batch context, built once per step and shared by every attention layer."""

    slot_mapping: torch.Tensor  # [num_tokens] int64; KV slot of each query row, negative = skip
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32; seq i owns q rows [qsl[i], qsl[i+1])
    seq_lens: torch.Tensor  # [num_seqs] int32; context length incl. this step's query tokens
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32; padded entries arbitrary
    num_decodes: int  # the first num_decodes sequences have query_len == 1
    num_decode_tokens: int  # == num_decodes
    max_query_len: int
    max_seq_len: int
    query_start_loc_cpu: torch.Tensor  # CPU int32 copy of query_start_loc
    seq_lens_cpu: torch.Tensor  # CPU int32 copy of seq_lens
    # Set by PagedAttentionBackend.plan() once per step: the metadata is validated and the
    # kernel choice, decode split and workspace are fixed, so each layer only launches. None for
    # metadata built by hand (tests, benchmarks): then every attention call plans for itself.
    plan: AttentionPlan | None = None

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens_cpu.shape[0])

    @property
    def num_prefills(self) -> int:
        return self.num_seqs - self.num_decodes

    @property
    def num_tokens(self) -> int:
        """Number of real query rows (the batch's q may be padded beyond this)."""
        return int(self.query_start_loc_cpu[-1])

    @property
    def num_prefill_tokens(self) -> int:
        return self.num_tokens - self.num_decode_tokens

    def validate(self, block_size: int | None = None) -> None:
        """Check internal consistency using only the CPU copies (no device sync).

        Raises ValueError naming the first inconsistency found. With ``block_size`` given, also
        checks that the block table is wide enough for the longest sequence.
        """
        qsl, lens = self.query_start_loc_cpu, self.seq_lens_cpu
        num_seqs = lens.shape[0]
        if qsl.dim() != 1 or qsl.shape[0] != num_seqs + 1:
            raise ValueError(
                f"query_start_loc must be [num_seqs + 1 = {num_seqs + 1}]; got {tuple(qsl.shape)}"
            )
        if self.block_tables.dim() != 2 or self.block_tables.shape[0] != num_seqs:
            raise ValueError(
                f"block_tables must be [num_seqs = {num_seqs}, max_blocks_per_seq]; "
                f"got {tuple(self.block_tables.shape)}"
            )
        if not 0 <= self.num_decodes <= num_seqs or self.num_decode_tokens != self.num_decodes:
            raise ValueError(
                f"need 0 <= num_decodes <= num_seqs ({num_seqs}) and num_decode_tokens == "
                f"num_decodes; got num_decodes={self.num_decodes}, "
                f"num_decode_tokens={self.num_decode_tokens}"
            )
        query_lens = qsl[1:].long() - qsl[:-1].long()  # [num_seqs]
        if int(qsl[0]) != 0 or bool((query_lens < 0).any()):
            raise ValueError(f"query_start_loc must start at 0 and be non-decreasing; got {qsl}")
        if bool((query_lens[: self.num_decodes] != 1).any()):
            raise ValueError(f"decode sequences must have query_len 1; got {query_lens}")
        if bool((lens.long() < query_lens).any()):
            raise ValueError(
                f"seq_lens must be >= query lengths; got seq_lens {lens}, query lens {query_lens}"
            )
        if self.slot_mapping.shape[0] < self.num_tokens:
            raise ValueError(
                f"slot_mapping must cover num_tokens = {self.num_tokens} rows; "
                f"got {tuple(self.slot_mapping.shape)}"
            )
        if block_size is not None and num_seqs > 0:
            longest = int(lens.max())
            if self.block_tables.shape[1] * block_size < longest:
                raise ValueError(
                    f"block_tables width {self.block_tables.shape[1]} x block_size {block_size} "
                    f"cannot hold the longest sequence ({longest} tokens)"
                )
