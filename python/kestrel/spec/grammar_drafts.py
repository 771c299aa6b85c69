"""Drafts for a request with a grammar (structured outputs): the proposer's drafts cut to the
longest prefix its grammar allows, checked on the request's matcher and rolled back (the matcher
is where it was). A draft that would complete the grammar ends the prefix before it, so every
verify row's mask (the grammar after the drafts before the row: `StructuredRequests.step_mask`)
is taken in a state that still allows a token."""

from __future__ import annotations

from typing import Any

import numpy as np


def grammar_prefix(matcher: Any, drafts: np.ndarray) -> np.ndarray:
    """`drafts` [k] -> its first n tokens, n the most the grammar accepts in order without
    completing; `matcher` (kestrel.structured.grammar.Matcher) is left as it was (the refused
    token is found without consuming it: that would put the matcher in its error state)."""
    n = matcher.valid_prefix(drafts.tolist())
    if n == 0:
        return drafts[:0]
    for token in drafts[:n].tolist():
        matcher.accept(int(token))
    completes = matcher.is_terminated  # complete after them: no row may follow the last one
    matcher.rollback(n)
    return drafts[: n - 1 if completes else n]
