"""Bounds on the work a constraint may cost: its size in characters and llguidance's parser
limits, and the stack its compile needs.

Why each bound (measured with llguidance 1.6 on the CI machine, see
tests/structured/test_hostile_grammars.py):
- llguidance compiles a grammar recursively: a Lark grammar that chains rules
  (`a: b?`, `b: c?`, ...) about 2,500 deep overflows an 8 MiB thread stack and kills the
  process (SIGSEGV) on a 60 KB grammar. Its compile costs at most ~5 KiB of stack per level,
  i.e. ~350 bytes per character of grammar text, so capping the text (`max_chars`) and running
  every compile on a thread with `stack_bytes` of stack (2 KiB per allowed character, >= 64 MiB)
  keeps it in bounds. Compiles take time about quadratic in such depth (30,000 levels: 4 s);
  at the default cap the worst seen is well under a second.
- `LLParserLimits` bound the lexer and parser: the fuel of the initial lexer build and of each
  token's mask computation, the Earley items per step, the lexer states and the grammar's size
  in symbols. A grammar that needs more is an error (the request fails, the engine goes on);
  the step limits bound the per-token mask time on the engine's step thread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kestrel.errors import InvalidRequestError

if TYPE_CHECKING:
    from kestrel.sampling_params import StructuredOutputsParams

# Characters of constraint text accepted by default (EngineConfig.max_grammar_chars).
DEFAULT_MAX_GRAMMAR_CHARS = 131_072
# Stack per allowed character of grammar text (llguidance needs ~350 bytes at worst), and floor.
_STACK_BYTES_PER_CHAR = 2048
_MIN_STACK_BYTES = 64 << 20
_MAX_STACK_BYTES = 2 << 30


@dataclass(frozen=True)
class GrammarLimits:
    """What one constraint may cost. The parser fields are llguidance's `LLParserLimits`
    (defaults: llguidance's own, spelled out so that they do not move with its releases)."""

    max_chars: int = DEFAULT_MAX_GRAMMAR_CHARS
    initial_lexer_fuel: int = 1_000_000  # building the lexer (~50k per ms)
    step_lexer_fuel: int = 200_000  # one token's mask, lexer part (~14k per ms)
    step_max_items: int = 50_000  # one token's mask, Earley items (~20k per ms)
    max_lexer_states: int = 250_000  # ~1-2 KB each
    max_grammar_size: int = 500_000  # symbols in the grammar's productions
    max_items_in_row: int = 2_000  # alternatives in one production row

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"GrammarLimits.{name} = {value!r} is invalid; allowed: an int >= 1"
                )

    @property
    def stack_bytes(self) -> int:
        """Stack of a thread that compiles grammars of up to `max_chars` characters."""
        wanted = max(_MIN_STACK_BYTES, self.max_chars * _STACK_BYTES_PER_CHAR)
        return min(wanted, _MAX_STACK_BYTES)

    def parser_limits(self) -> Any:
        import llguidance

        return llguidance.LLParserLimits(
            max_items_in_row=self.max_items_in_row,
            initial_lexer_fuel=self.initial_lexer_fuel,
            step_lexer_fuel=self.step_lexer_fuel,
            step_max_items=self.step_max_items,
            max_lexer_states=self.max_lexer_states,
            max_grammar_size=self.max_grammar_size,
        )


def constraint_chars(constraint: StructuredOutputsParams) -> int:
    """Characters of a constraint's text: a JSON schema as compact JSON (or its text as
    given), the regex, the choices together, the grammar."""
    kind = constraint.kind
    if kind == "json":
        schema = constraint.json
        if isinstance(schema, str):
            return len(schema)
        try:
            return len(json.dumps(schema, separators=(",", ":"), ensure_ascii=False))
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError(
                "structured_outputs", f"the JSON schema cannot be serialized: {exc}"
            ) from exc
    if kind == "regex":
        return len(constraint.regex or "")
    if kind == "choice":
        return sum(len(c) + 1 for c in constraint.choice or ())
    if kind == "grammar":
        return len(constraint.grammar or "")
    return 0  # json_object: a fixed grammar


def check_size(constraint: StructuredOutputsParams, limits: GrammarLimits, param: str) -> None:
    """InvalidRequestError naming the size and the cap when the constraint is too large."""
    size = constraint_chars(constraint)
    if size > limits.max_chars:
        raise InvalidRequestError(
            param,
            f"the {constraint.kind} constraint is {size} characters long; allowed: at most "
            f"{limits.max_chars} (--max-grammar-chars)",
        )
