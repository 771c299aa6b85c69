"""Speculation for requests with a grammar: n-gram drafts are cut to what the grammar allows
(`kestrel/spec/grammar_drafts.py`), every verify row is masked by the grammar after the drafts
before it, and the outputs are the plain engine's (greedy, fp32 on the CPU) and follow the
constraint."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from kestrel import LLM, SamplingParams
from kestrel.sampling_params import StructuredOutputsParams as Constraint
from kestrel.spec.grammar_drafts import grammar_prefix

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3,
        "min_acceptance_rate": 0}  # fmt: skip


class FakeMatcher:
    """Accepts the tokens of `allowed` in order; complete after all of them."""

    def __init__(self, allowed: list[int]) -> None:
        self.allowed, self.pos = allowed, 0

    def valid_prefix(self, tokens: list[int]) -> int:
        n = 0
        while n < len(tokens) and self.pos + n < len(self.allowed):
            if self.allowed[self.pos + n] != tokens[n]:
                break
            n += 1
        return n

    def accept(self, token: int) -> bool:
        assert self.allowed[self.pos] == token, "a refused token must not be consumed"
        self.pos += 1
        return True

    def rollback(self, n: int) -> None:
        self.pos -= n

    @property
    def is_terminated(self) -> bool:
        return self.pos == len(self.allowed)


def test_grammar_prefix_cuts_at_the_first_refused_draft_and_before_completion():
    m = FakeMatcher([5, 6, 7, 8, 9])
    assert grammar_prefix(m, np.array([5, 6, 1, 8])).tolist() == [5, 6]
    assert m.pos == 0  # rolled back
    assert grammar_prefix(m, np.array([5, 6, 7])).tolist() == [5, 6, 7]
    # All five complete the grammar: the last one is left to the bonus row.
    assert grammar_prefix(m, np.array([5, 6, 7, 8, 9])).tolist() == [5, 6, 7, 8]
    assert grammar_prefix(m, np.array([3])).tolist() == []
    assert m.pos == 0


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    def make(spec) -> LLM:
        return LLM(tiny_model_dir("qwen2"), max_model_len=512, max_num_seqs=4,
                   speculative_config=spec)  # fmt: skip

    return {"spec": make(SPEC), "plain": make(None)}


CASES = [
    (Constraint(regex=r"(ab ){12}done"), lambda t: re.fullmatch(r"(ab ){12}done", t)),
    (Constraint(choice=["ab ab ab ab ab done", "ab ab cd"]), lambda t: t.startswith("ab ab")),
    (
        Constraint(json={"type": "array", "items": {"enum": ["xy", "z"]}, "minItems": 6,
                         "maxItems": 6}),
        lambda t: len(json.loads(t)) == 6,
    ),
]  # fmt: skip


def test_grammar_requests_speculate_with_the_plain_outputs(engines):
    prompts = ["hi", "ab ab ab", "1 2 3"]
    before = engines["spec"].engine.stats()["spec_decode_num_accepted_tokens"]
    for constraint, ok in CASES:
        params = SamplingParams(temperature=0.0, max_tokens=120, structured_outputs=constraint)
        spec = engines["spec"].generate(prompts, params, use_tqdm=False)
        plain = engines["plain"].generate(prompts, params, use_tqdm=False)
        for a, b in zip(spec, plain, strict=True):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            assert a.outputs[0].finish_reason == "stop" and ok(a.outputs[0].text), a.outputs[0].text
    stats = engines["spec"].engine.stats()
    assert stats["spec_decode_num_accepted_tokens"] > before  # the grammars' drafts were used
    assert stats["kv_cache_usage"] == 0.0


def test_sampled_grammar_requests_speculate_within_the_constraint(engines):
    constraint, ok = CASES[0]
    params = SamplingParams(temperature=1.0, seed=3, n=3, max_tokens=120,
                            structured_outputs=constraint)  # fmt: skip
    for c in engines["spec"].generate(["x"], params, use_tqdm=False)[0].outputs:
        assert c.finish_reason == "stop" and ok(c.text), c.text
