"""Speculative decoding: the config, proposers (n-gram prompt lookup) and greedy verification."""

from kestrel.spec.config import SpeculativeConfig
from kestrel.spec.greedy import SpecCounters, verify_greedy
from kestrel.spec.ngram import NgramProposer

__all__ = ["NgramProposer", "SpecCounters", "SpeculativeConfig", "verify_greedy"]
