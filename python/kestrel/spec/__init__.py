"""Speculative decoding: the config, proposers (n-gram prompt lookup), the draft-aware verify
rows, the rejection sampler and the verification of the rows' tokens."""

from kestrel.spec.config import SpeculativeConfig
from kestrel.spec.draft_rows import DraftRows
from kestrel.spec.greedy import SpecCounters, verify_greedy
from kestrel.spec.ngram import NgramProposer
from kestrel.spec.rejection import rejection_sample

__all__ = [
    "DraftRows",
    "NgramProposer",
    "SpecCounters",
    "SpeculativeConfig",
    "rejection_sample",
    "verify_greedy",
]
