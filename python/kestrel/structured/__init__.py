"""Structured outputs (JSON schema, regex, choice, grammar) through a token-mask grammar engine."""

from kestrel.structured.bitmask import GrammarMask, apply_bitmask
from kestrel.structured.grammar import GrammarBackend, Matcher, check

__all__ = ["GrammarBackend", "GrammarMask", "Matcher", "apply_bitmask", "check"]
