"""Structured outputs (JSON schema, regex, choice, grammar) through a token-mask grammar engine."""

from kestrel.structured.bitmask import BitmaskApplier, GrammarMask, apply_bitmask
from kestrel.structured.grammar import GrammarBackend, Matcher, check
from kestrel.structured.limits import DEFAULT_MAX_GRAMMAR_CHARS, GrammarLimits
from kestrel.structured.threads import GrammarThreads

__all__ = [
    "DEFAULT_MAX_GRAMMAR_CHARS",
    "BitmaskApplier",
    "GrammarBackend",
    "GrammarLimits",
    "GrammarMask",
    "GrammarThreads",
    "Matcher",
    "apply_bitmask",
    "check",
]
