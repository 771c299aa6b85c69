"""GrammarLimits (the size cap, llguidance's parser limits, the compile stack) and
GrammarThreads (the large-stack workers every check and compile runs on)."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from kestrel.config import EngineConfig
from kestrel.errors import InvalidRequestError
from kestrel.sampling_params import StructuredOutputsParams as Constraint
from kestrel.structured import DEFAULT_MAX_GRAMMAR_CHARS, GrammarLimits, GrammarThreads, check
from kestrel.structured.limits import constraint_chars


def test_default_cap_is_the_engine_configs():
    default = next(f for f in dataclasses.fields(EngineConfig) if f.name == "max_grammar_chars")
    assert default.default == DEFAULT_MAX_GRAMMAR_CHARS
    for bad in (0, -1, True, 1.5, (1 << 20) + 1):
        with pytest.raises(ValueError, match="max_grammar_chars"):
            EngineConfig(max_grammar_chars=bad)


def test_limits_validate_their_fields_and_size_the_stack():
    with pytest.raises(ValueError, match="step_lexer_fuel = 0"):
        GrammarLimits(step_lexer_fuel=0)
    assert GrammarLimits().stack_bytes >= 64 << 20
    assert GrammarLimits(max_chars=1 << 20).stack_bytes == 2 << 30
    assert GrammarLimits(max_chars=10).stack_bytes == 64 << 20


def test_constraint_chars():
    assert constraint_chars(Constraint(json={"a": [1, 2]})) == len('{"a":[1,2]}')
    assert constraint_chars(Constraint(json='{"a": 1}')) == 8
    assert constraint_chars(Constraint(regex="abc")) == 3
    assert constraint_chars(Constraint(choice=["ab", "c"])) == 5
    assert constraint_chars(Constraint(grammar="start: x")) == 8
    assert constraint_chars(Constraint(json_object=True)) == 0


def test_check_names_the_param_and_the_sizes():
    with pytest.raises(InvalidRequestError) as err:
        check(Constraint(regex="a" * 11), GrammarLimits(max_chars=10), "guided_regex")
    assert err.value.param == "guided_regex"
    assert "11 characters" in str(err.value) and "at most 10" in str(err.value)
    with pytest.raises(InvalidRequestError, match="cannot be compiled"):
        check(Constraint(regex="("), GrammarLimits(), "response_format")


def test_parser_limits_are_applied():
    """A grammar within the size cap but over llguidance's grammar-size limit is refused."""
    grammar = "start: " + " | ".join(f'"w{i}"' for i in range(3000))
    assert check(Constraint(grammar=grammar), GrammarLimits()) != ""
    with pytest.raises(InvalidRequestError, match="cannot be compiled"):
        check(Constraint(grammar=grammar), GrammarLimits(max_grammar_size=100))


def test_threads_run_deep_grammars_and_report_errors():
    """5,000 chained rules overflow a default 8 MiB stack (the process dies); the pool's
    threads have the stack the limits ask for."""
    depth = 5000
    rules = "\n".join(f'r{i}: "a" r{i + 1}?' for i in range(depth))
    deep = Constraint(grammar=f'start: r0\n{rules}\nr{depth}: "b"')
    pool = GrammarThreads(2, GrammarLimits().stack_bytes, "test-grammar")
    try:
        assert pool.submit(check, deep, GrammarLimits()).result(timeout=60)
        with pytest.raises(InvalidRequestError):
            pool.submit(check, Constraint(regex="["), GrammarLimits()).result(timeout=60)
        names = pool.submit(lambda: threading.current_thread().name).result(timeout=10)
        assert names.startswith("test-grammar-")
    finally:
        pool.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(print)
    assert threading.stack_size() == 0  # the process-wide default is left as it was
