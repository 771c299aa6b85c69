"""Structured outputs in the engine (llguidance): outputs follow the constraint, bad constraints
fail their own request (checked in the compile worker), and a request waiting for its grammar
can be aborted. Hostile grammars: tests/engine/test_hostile_grammars.py."""

from __future__ import annotations

import json
import re

import pytest

from kestrel import LLM, SamplingParams
from kestrel.errors import InvalidRequestError
from kestrel.sampling_params import StructuredOutputsParams as Constraint

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"enum": ["ada", "bob", "cy"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir("qwen2"), max_model_len=512, max_num_seqs=8)


def _check_schema(value: dict) -> None:
    assert set(value) == {"name", "age", "tags"}
    assert value["name"] in SCHEMA["properties"]["name"]["enum"]
    assert isinstance(value["age"], int) and 0 <= value["age"] <= 99
    assert all(t in ("x", "y") for t in value["tags"]) and len(value["tags"]) <= 3


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_outputs_parse_and_follow_the_schema(llm, temperature):
    params = SamplingParams(
        temperature=temperature,
        seed=3,
        n=2,
        max_tokens=200,
        structured_outputs=Constraint(json=SCHEMA),
    )
    outs = llm.generate(["The kestrel", [5, 6, 7, 8]], params, use_tqdm=False)
    for out in outs:
        for c in out.outputs:
            assert c.finish_reason == "stop", c.text
            _check_schema(json.loads(c.text))


def test_regex_choice_and_grammar(llm):
    cases = [
        (Constraint(regex=r"[0-9]{3}-[a-z]{2}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
        (Constraint(choice=["yes", "no", "maybe"]), lambda t: t in ("yes", "no", "maybe")),
        (
            Constraint(grammar='start: "a" ("b" | "c") ("b" | "c")? "!"'),
            lambda t: re.fullmatch(r"a[bc]{1,2}!", t),
        ),
        (Constraint(grammar='root ::= "x" [0-9] "y"'), lambda t: re.fullmatch(r"x[0-9]y", t)),
    ]
    for constraint, ok in cases:
        params = SamplingParams(
            temperature=1.0, seed=5, n=3, max_tokens=64, structured_outputs=constraint
        )
        for c in llm.generate(["hi"], params, use_tqdm=False)[0].outputs:
            assert c.finish_reason == "stop" and ok(c.text), (constraint, c.text)


def test_json_object(llm):
    params = SamplingParams(
        temperature=0.0, max_tokens=300, structured_outputs=Constraint(json_object=True)
    )
    c = llm.generate(["hi"], params, use_tqdm=False)[0].outputs[0]
    if c.finish_reason == "stop":
        assert isinstance(json.loads(c.text), dict)
    else:  # cut by max_tokens: still a prefix of a JSON object
        assert c.text.startswith("{")


BAD_CONSTRAINTS = [
    (Constraint(regex="["), "regex"),
    (Constraint(json={"type": "bogus"}), "bogus"),
    (Constraint(json="{not json"), "not valid JSON"),
    (Constraint(grammar="start: undefined_rule"), "grammar"),
    (Constraint(grammar="start: <[999999]>"), "grammar"),  # fails only against the vocabulary
]


def test_bad_constraints_fail_their_request_alone(llm):
    """Checked in the compile worker, not in add_request: each bad one comes back as its own
    request's error; the good request of the same batch runs to its end."""
    ok = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    params = [SamplingParams(max_tokens=5, structured_outputs=c) for c, _ in BAD_CONSTRAINTS]
    outs = llm.generate([[4, 5]] * len(params) + [[4, 5, 6]], params + [ok], use_tqdm=False)
    for out, (constraint, words) in zip(outs, BAD_CONSTRAINTS):
        assert out.error is not None and words in out.error, (constraint, out.error)
        assert "structured output failed" in out.error
        assert [c.finish_reason for c in out.outputs] == ["error"]
    assert outs[-1].error is None and len(outs[-1].outputs[0].token_ids) == 6
    assert not llm.engine.has_unfinished_requests()
    with pytest.raises(InvalidRequestError, match="exactly one"):
        Constraint(regex="a", choice=["b"])


def test_abort_while_the_grammar_compiles(llm):
    engine = llm.engine
    params = SamplingParams(max_tokens=8, structured_outputs=Constraint(json=SCHEMA))
    engine.add_request("w", [4, 5, 6], params)
    engine.abort_request("w")  # before any step: still waiting for its matcher
    assert not engine.has_unfinished_requests()
    engine.add_request("v", [4, 5, 6], params.clone(temperature=0.0, max_tokens=200))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    final = [o for o in outputs if o.finished][-1]
    _check_schema(json.loads(final.outputs[0].text))
