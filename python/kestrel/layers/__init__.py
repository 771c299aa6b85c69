"""Reusable model building blocks (linear projections, norms, embeddings, rotary, attention)."""

from kestrel.layers.attention import PagedAttention
from kestrel.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from kestrel.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    LinearMethodBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    QuantConfig,
    ReplicatedLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
    default_weight_loader,
    linear_method_for,
    process_weights_after_loading,
)
from kestrel.layers.norm import RMSNorm
from kestrel.layers.parallel import SINGLE_RANK, TensorParallelGroup
from kestrel.layers.rotary import RotaryEmbedding

__all__ = [
    "SINGLE_RANK",
    "ColumnParallelLinear",
    "LinearBase",
    "LinearMethodBase",
    "MergedColumnParallelLinear",
    "PagedAttention",
    "ParallelLMHead",
    "QKVParallelLinear",
    "QuantConfig",
    "RMSNorm",
    "ReplicatedLinear",
    "RotaryEmbedding",
    "RowParallelLinear",
    "TensorParallelGroup",
    "UnquantizedLinearMethod",
    "VocabParallelEmbedding",
    "default_weight_loader",
    "linear_method_for",
    "process_weights_after_loading",
]
