"""Structured outputs: compile a request's constraint into a token matcher (llguidance).

Backend: llguidance (Rust, no Python dependencies). xgrammar was measured beside it (see
docs/performance.md: xgrammar's mask is about 3x cheaper per token, llguidance compiles a JSON
schema 20-50x faster and installs with nothing else, where xgrammar pulls in triton (1 GB) and
transformers); the backend sits behind this module, so another can be added.

Life of a constrained request (see `LLMEngine`): the API server `check`s the constraint before
it sends the request (in a `GrammarThreads` worker, off its event loop: a bad one is a 400
naming the request field); the engine only looks at its kind when the request is added and
`compile_async` does all the work in a worker thread (size cap, grammar text, compile under
`GrammarLimits`; the first use also builds the backend's view of the vocabulary, seconds for a
150k vocabulary). The request waits outside the scheduler until its matcher is ready, so the
step loop never waits on a grammar; one that fails fails that request alone. Per step,
`Matcher.fill_bitmask` writes the allowed-token bitmask of the next token (one bit per token
id, int32 words) and `accept` advances it by the sampled token; `rollback` undoes tokens (for
speculative decoding).
"""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import numpy as np

from kestrel.errors import InvalidRequestError
from kestrel.structured.limits import GrammarLimits, check_size
from kestrel.structured.threads import GrammarThreads

if TYPE_CHECKING:
    from kestrel.sampling_params import StructuredOutputsParams
    from kestrel.tokenizer import Tokenizer

PARAM = "structured_outputs"
# JSON is written with json.dumps' separators and no other whitespace: flexible whitespace
# lets a model loop on spaces and newlines until max_tokens (seen with random weights, and a
# known failure of real models), so the output is bounded by its content. A schema may still
# ask otherwise through llguidance's "x-guidance" options.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance():
    import llguidance

    return llguidance


def _gbnf_to_lark(text: str) -> str:
    from llguidance.gbnf_to_lark import gbnf_to_lark

    return gbnf_to_lark(text)


def grammar_text(
    constraint: StructuredOutputsParams, limits: GrammarLimits, param: str = PARAM
) -> str:
    """The llguidance grammar of a constraint (not yet checked); InvalidRequestError naming
    `param` when it is too large or malformed."""
    check_size(constraint, limits, param)
    llg = _llguidance().LLMatcher
    kind = constraint.kind
    if kind == "json":
        schema = constraint.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise InvalidRequestError(
                    param, f"the JSON schema is not valid JSON: {exc}"
                ) from exc
        if not isinstance(schema, dict):
            raise InvalidRequestError(param, "the JSON schema must be a JSON object")
        try:
            return llg.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        except ValueError as exc:
            raise InvalidRequestError(param, f"the JSON schema cannot be used: {exc}") from exc
    if kind == "json_object":
        return llg.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS)
    if kind == "regex":
        return llg.grammar_from_regex(constraint.regex)
    if kind == "choice":
        assert constraint.choice is not None
        return llg.grammar_from_regex("|".join(re.escape(c) for c in constraint.choice))
    assert constraint.grammar is not None
    text = constraint.grammar
    if "::=" in text:  # GBNF (llama.cpp / vLLM's EBNF), else Lark
        try:
            text = _gbnf_to_lark(text)
        except Exception as exc:
            raise InvalidRequestError(param, f"the grammar cannot be used: {exc}") from exc
    return llg.grammar_from_lark(text)


def check(
    constraint: StructuredOutputsParams, limits: GrammarLimits | None = None, param: str = PARAM
) -> str:
    """The constraint's grammar, validated (without a vocabulary) under `limits`;
    InvalidRequestError naming `param` and the problem if it cannot be used. Run it on a
    `GrammarThreads` thread: a deep grammar overflows a default-sized stack."""
    limits = limits or GrammarLimits()
    grammar = grammar_text(constraint, limits, param)
    error = _llguidance().LLMatcher.validate_grammar(grammar, limits=limits.parser_limits())
    if error and not error.startswith("WARNING"):
        raise InvalidRequestError(param, f"the {constraint.kind} constraint cannot be compiled: "
                                  f"{error.strip()[:500]}")  # fmt: skip
    return grammar


class Matcher:
    """The grammar state of one sequence."""

    def __init__(self, matcher: Any, num_words: int) -> None:
        self._m = matcher
        self.num_words = num_words  # int32 words of one bitmask row

    def fill_bitmask(self, row: np.ndarray) -> None:
        """Writes the next token's allowed set into `row` ([num_words] int32, C-contiguous)."""
        assert row.dtype == np.int32 and row.shape == (self.num_words,) and row.flags.c_contiguous
        self._m.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)

    def accept(self, token: int) -> bool:
        """Advances by `token`; False when the grammar does not allow it (error state)."""
        return bool(self._m.consume_token(token))

    def rollback(self, num_tokens: int) -> None:
        self._m.rollback(num_tokens)

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of `tokens`, in order, the grammar would accept from here (the state does
        not change: a refused token would leave the matcher in its error state)."""
        return int(self._m.validate_tokens(tokens))

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and allows nothing more, or it is in an error state."""
        return bool(self._m.is_stopped() or self._m.is_error())

    def copy(self) -> Matcher:
        return Matcher(self._m.deep_copy(), self.num_words)


class GrammarBackend:
    """One per engine: the vocabulary view (built once, lazily) and the compile threads."""

    def __init__(
        self, tokenizer: Tokenizer, eos_token_id: int | None, limits: GrammarLimits | None = None
    ) -> None:
        self._tokenizer = tokenizer
        self._eos = eos_token_id
        self.limits = limits or GrammarLimits()
        self._pool = GrammarThreads(2, self.limits.stack_bytes, "kestrel-grammar")
        self._lock = threading.Lock()
        self._ll_tokenizer: Any = None
        self._executor: Any = None  # llguidance's parallel mask executor, made on first use

    def _vocab(self) -> Any:
        with self._lock:
            if self._ll_tokenizer is None:
                llg = _llguidance()
                self._ll_tokenizer = llg.LLTokenizer(
                    self._tokenizer.backend_json(), eos_token=self._eos
                )
            return self._ll_tokenizer

    @property
    def num_words(self) -> int:
        return (self._vocab().vocab_size + 31) // 32

    def fill_bitmasks(self, matchers: list[Matcher], bitmask: np.ndarray) -> None:
        """Row k of `bitmask` ([len(matchers), num_words] int32, C-contiguous) gets matcher k's
        next-token mask; several rows are computed in parallel on llguidance's thread pool."""
        if len(matchers) == 1:
            matchers[0].fill_bitmask(bitmask[0])
            return
        assert bitmask.dtype == np.int32 and bitmask.flags.c_contiguous
        if self._executor is None:
            self._executor = _llguidance().LLExecutor()
        row_bytes = bitmask.shape[1] * 4
        pairs = [(m._m, k) for k, m in enumerate(matchers)]
        self._executor.unsafe_compute_mask_ptr(pairs, bitmask.ctypes.data, row_bytes, len(pairs))

    def compile_async(self, constraint: StructuredOutputsParams) -> Future[Matcher]:
        """A matcher for a constraint, built in a worker thread (everything from the size
        check on happens there); the future raises InvalidRequestError if it cannot be used."""
        return self._pool.submit(self._compile, constraint)

    def _compile(self, constraint: StructuredOutputsParams) -> Matcher:
        grammar = grammar_text(constraint, self.limits)
        vocab = self._vocab()
        llg = _llguidance()
        matcher = llg.LLMatcher(vocab, grammar, log_level=0, limits=self.limits.parser_limits())
        if matcher.is_error():
            raise InvalidRequestError(PARAM, f"the {constraint.kind} constraint cannot be "
                                      f"compiled: {matcher.get_error().strip()[:500]}")  # fmt: skip
        return Matcher(matcher, (vocab.vocab_size + 31) // 32)

    def shutdown(self) -> None:
        self._pool.shutdown()
