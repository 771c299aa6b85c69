"""Vocabulary-parallel token embedding and LM head (optionally sharing the embedding matrix).

The vocabulary is split into `tp` contiguous ranges of ceil(vocab_size / tp) ids; rank r holds
the rows of ids [r * rows, min((r + 1) * rows, vocab_size)) and zero padding rows after them (on
the last ranks when tp does not divide vocab_size). At tensor-parallel size 1 there is one range,
no padding and no communication: the lookup is `F.embedding` and the head `F.linear`, exactly.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
import torch.nn.functional as F
from torch import nn

from kestrel.layers.linear import Device, new_parameter
from kestrel.layers.parallel import SINGLE_RANK, TensorParallelGroup


class _VocabParallel(nn.Module):
    """A weight [rows_per_partition, hidden_size] holding this rank's slice of the vocabulary."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        tp_group: TensorParallelGroup,
        prefix: str,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.tp_group = tp_group
        self.prefix = prefix
        self.rows_per_partition = -(-vocab_size // tp_group.size)  # ceil
        self.vocab_start = min(tp_group.rank * self.rows_per_partition, vocab_size)
        self.vocab_end = min(self.vocab_start + self.rows_per_partition, vocab_size)
        # The ranks' rows together cover more than the vocabulary (padding rows).
        self.padded = self.rows_per_partition * tp_group.size != vocab_size

    def _create_weight(self, dtype: torch.dtype, device: Device) -> None:
        self.weight = new_parameter((self.rows_per_partition, self.hidden_size), dtype, device)
        self.weight.output_dim = 0
        self.weight.weight_loader = self.weight_loader

    def weight_loader(
        self,
        param: torch.Tensor,
        loaded_weight: torch.Tensor,
        shard_id: Hashable | None = None,
        expert_id: int | None = None,
    ) -> None:
        """Copy rows [vocab_start, vocab_end) of the full [vocab_size, hidden_size] checkpoint
        tensor into `param`; the padding rows after them are zeroed."""
        name = f"{self.prefix}.weight" if self.prefix else "weight"
        if shard_id is not None or expert_id is not None:
            raise ValueError(
                f"{name} has no shards or experts; got shard_id={shard_id!r}, "
                f"expert_id={expert_id!r}"
            )
        expected = (self.vocab_size, self.hidden_size)
        if tuple(loaded_weight.shape) != expected:
            raise ValueError(
                f"{name}: shape mismatch: checkpoint tensor {tuple(loaded_weight.shape)}, "
                f"expected {expected}"
            )
        rows = self.vocab_end - self.vocab_start
        param.data[:rows].copy_(loaded_weight[self.vocab_start : self.vocab_end])
        if rows < self.rows_per_partition:
            param.data[rows:].zero_()


class VocabParallelEmbedding(_VocabParallel):
    """Token lookup; weight [rows_per_partition, hidden_size] (= [vocab_size, hidden] at tp 1).

    At tp > 1 each rank looks up the ids of its range (others give zero rows) and the partial
    embeddings are summed over the ranks (all-reduce).
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: Device = None,
        tp_group: TensorParallelGroup = SINGLE_RANK,
        prefix: str = "",
    ) -> None:
        super().__init__(vocab_size, hidden_size, tp_group, prefix)
        self._create_weight(dtype, device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids [num_tokens] int, each in [0, vocab_size) -> [num_tokens, hidden_size]
        if self.tp_group.size == 1:
            return F.embedding(input_ids, self.weight)
        mine = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)  # [num_tokens]
        local_ids = torch.where(mine, input_ids - self.vocab_start, 0)
        out = F.embedding(local_ids, self.weight)  # [num_tokens, hidden_size]
        out.masked_fill_(~mine.unsqueeze(-1), 0)
        return self.tp_group.all_reduce(out)


class ParallelLMHead(_VocabParallel):
    """Projection to vocabulary logits; weight [rows_per_partition, hidden_size], sharded like
    `VocabParallelEmbedding`. Each rank computes its vocabulary slice of the logits; they are
    all-gathered (rank order) and the padding columns dropped.

    With `tie_to` given, the head has no parameter of its own and reuses that embedding's
    weight (so it is loaded, and listed by `named_parameters`, only once); both must have the
    same vocabulary and parallel group.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: Device = None,
        tp_group: TensorParallelGroup = SINGLE_RANK,
        tie_to: VocabParallelEmbedding | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__(vocab_size, hidden_size, tp_group, prefix)
        if tie_to is None:
            self._create_weight(dtype, device)
            return
        if (tie_to.vocab_size, tie_to.hidden_size, tie_to.tp_group) != (
            vocab_size,
            hidden_size,
            tp_group,
        ):
            raise ValueError(
                f"{prefix or 'lm_head'}: cannot tie to an embedding of another shape or group "
                f"({tie_to.vocab_size}x{tie_to.hidden_size} on {tie_to.tp_group} vs "
                f"{vocab_size}x{hidden_size} on {tp_group})"
            )
        self.weight = tie_to.weight

    def forward(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [num_rows, hidden_size] -> logits [num_rows, vocab_size] float32, into `out`
        when given (a CUDA graph's static buffer shared by every captured size)."""
        logits = F.linear(hidden, self.weight)  # [num_rows, rows_per_partition]
        logits = self.tp_group.all_gather(logits, dim=-1)  # [num_rows, tp * rows_per_partition]
        if self.padded:
            logits = logits[..., : self.vocab_size]
        if out is None:
            return logits.float()
        if out.shape != logits.shape or out.dtype != torch.float32:
            raise ValueError(
                f"out must be float32 {tuple(logits.shape)}; got {out.dtype} {tuple(out.shape)}"
            )
        return out.copy_(logits)
