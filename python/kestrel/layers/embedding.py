"""Token embedding and the LM head (optionally sharing the embedding matrix)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kestrel.layers.linear import default_weight_loader, new_parameter


class VocabEmbedding(nn.Module):
    """Lookup table; weight [vocab_size, hidden_size]."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = new_parameter((vocab_size, hidden_size), dtype, device)
        self.weight.weight_loader = default_weight_loader

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids [num_tokens] int, each in [0, vocab_size) -> [num_tokens, hidden_size]
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """Projection to vocabulary logits; weight [vocab_size, hidden_size].

    With `tie_to` given, the head has no parameter of its own and reuses that embedding's
    weight (so it is loaded, and listed by `named_parameters`, only once).
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device | str | None,
        tie_to: VocabEmbedding | None = None,
    ) -> None:
        super().__init__()
        if tie_to is not None:
            self.weight = tie_to.weight
        else:
            self.weight = new_parameter((vocab_size, hidden_size), dtype, device)
            self.weight.weight_loader = default_weight_loader

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden [num_rows, hidden_size] -> logits [num_rows, vocab_size] float32
        return F.linear(hidden, self.weight).float()
