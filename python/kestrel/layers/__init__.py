"""Reusable model building blocks (linear projections, norms, embeddings, rotary, attention)."""

from kestrel.layers.attention import PagedAttention
from kestrel.layers.embedding import LMHead, VocabEmbedding
from kestrel.layers.linear import Linear, MergedLinear, default_weight_loader
from kestrel.layers.norm import RMSNorm
from kestrel.layers.rotary import RotaryEmbedding

__all__ = [
    "LMHead",
    "Linear",
    "MergedLinear",
    "PagedAttention",
    "RMSNorm",
    "RotaryEmbedding",
    "VocabEmbedding",
    "default_weight_loader",
]
