"""The pipeline-parallel stage a process runs: a contiguous range of the decoder's layers.

Stage 0 (the engine's process) also owns the embedding, the final norm and the LM head: it
embeds the step's tokens, runs its layers, sends the hidden states and the residual stream to
stage 1, and receives them back from the last stage to finish (norm, logits, sampling, all
unchanged). Every other stage receives from the previous one, runs its layers and sends on.
`SINGLE_STAGE`, the default, is the whole model in one process: no communication at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


def layer_ranges(num_layers: int, size: int) -> list[tuple[int, int]]:
    """[start, end) of each stage's layers, as even as possible (earlier stages take the extra
    layers); every stage gets at least one."""
    if size < 1 or size > num_layers:
        raise ValueError(
            f"pipeline_parallel_size={size} must be in [1, {num_layers}] (the model's "
            f"{num_layers} layers, at least one per stage)"
        )
    base, extra = divmod(num_layers, size)
    ranges, start = [], 0
    for rank in range(size):
        end = start + base + (1 if rank < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


@dataclass(frozen=True)
class PipelineStage:
    """This process's stage: `rank` in [0, `size`) (its layers: `layers(num_layers)`), and its
    place `tp_rank` in its stage's tensor-parallel group of `tp_size`. Global ranks (the
    default torch.distributed group's, only touched when size > 1) are stage * tp_size +
    tp_rank: each tensor-parallel rank talks to the same tensor-parallel rank of the next
    stage."""

    rank: int = 0
    size: int = 1
    tp_rank: int = 0
    tp_size: int = 1

    def layers(self, num_layers: int) -> range:
        if self.size == 1:
            return range(num_layers)
        start, end = layer_ranges(num_layers, self.size)[self.rank]
        return range(start, end)

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def _peer(self, stage: int) -> int:
        return (stage % self.size) * self.tp_size + self.tp_rank

    def send_to_next(self, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        """Hidden states and residual [T, H] to the next stage (the last stage: to stage 0)."""
        dst = self._peer(self.rank + 1)
        dist.send(hidden.contiguous(), dst=dst)
        dist.send(residual.contiguous(), dst=dst)

    def recv_from_previous(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states and residual from the previous stage (stage 0: from the last one),
        shaped and typed as `like`."""
        src = self._peer(self.rank - 1)
        hidden, residual = torch.empty_like(like), torch.empty_like(like)
        dist.recv(hidden, src=src)
        dist.recv(residual, src=src)
        return hidden, residual


SINGLE_STAGE = PipelineStage()
