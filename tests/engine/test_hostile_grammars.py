"""Hostile constraints never stall the engine: every check and compile runs in the grammar
worker threads (large stacks, the GIL dropped by llguidance), so a slow or deep grammar delays
only its own request, and one over the size cap fails alone with a message naming both sizes."""

from __future__ import annotations

import re
import time

import pytest

from kestrel import LLM, SamplingParams
from kestrel.sampling_params import StructuredOutputsParams as Constraint


def chain_grammar(depth: int) -> str:
    """`a` repeated 1..depth times, then `b`: each rule refers to the next, so llguidance's
    compile recurses `depth` deep (about 2,500 levels overflow an 8 MiB stack)."""
    rules = [f'r{i}: "a" r{i + 1}?' for i in range(depth)]
    return "start: r0\n" + "\n".join(rules) + f'\nr{depth}: "b"'


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    # A cap far above the default, so that the slow grammar below is allowed.
    return LLM(
        tiny_model_dir("qwen2"), max_model_len=256, max_num_seqs=8, max_grammar_chars=1 << 20
    )


def _run(engine, until_done: set[str]) -> dict[str, tuple[float, object]]:
    """Steps until every request is done: {request id: (seconds from now, final output)}."""
    t0 = time.perf_counter()
    done: dict[str, tuple[float, object]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = (time.perf_counter() - t0, out)
    assert set(done) == until_done
    return done


def test_deep_grammar_compiles_without_crashing(llm):
    """6,000 levels: a default thread stack would overflow (SIGSEGV, the whole process)."""
    grammar = chain_grammar(6000)
    assert len(grammar) < 131_072  # allowed by the default cap too
    params = SamplingParams(
        temperature=1.0, seed=1, max_tokens=8, structured_outputs=Constraint(grammar=grammar)
    )
    out = llm.generate([[4, 5]], params, use_tqdm=False)[0]
    assert out.error is None, out.error
    assert re.fullmatch(r"a{1,8}b?", out.outputs[0].text), out.outputs[0].text


def test_slow_grammar_does_not_delay_an_unconstrained_request(llm):
    """A grammar that takes seconds to compile (30,000 levels): add_request returns at once,
    and a plain request added after it runs to its end while the grammar still compiles."""
    engine = llm.engine
    slow = Constraint(grammar=chain_grammar(30_000))
    t0 = time.perf_counter()
    engine.add_request("slow", [4, 5], SamplingParams(max_tokens=4, structured_outputs=slow))
    add_s = time.perf_counter() - t0
    plain = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    engine.add_request("plain", [4, 5, 6], plain)
    done = _run(engine, {"slow", "plain"})
    plain_s, plain_out = done["plain"]
    slow_s, slow_out = done["slow"]
    assert add_s < 0.25, f"add_request took {add_s:.3f} s"
    assert len(plain_out.outputs[0].token_ids) == 12
    # The compile is still going when the plain one ends (generous: on a 2-core machine the
    # compile thread takes a core from torch's threads; on an idle one it takes ~0.9 s).
    assert slow_s > 0.2, f"the slow grammar compiled in {slow_s:.2f} s: not slow enough to test"
    assert plain_s < 0.75 * slow_s, (plain_s, slow_s)
    assert slow_out.error is None and re.fullmatch(r"a{1,4}", slow_out.outputs[0].text)


def test_oversized_constraint_fails_alone_naming_the_sizes(tiny_model_dir):
    small = LLM(tiny_model_dir("qwen2"), max_model_len=256, max_num_seqs=4, max_grammar_chars=100)
    outs = small.generate(
        [[4, 5], [4, 5], [4, 5]],
        [
            SamplingParams(structured_outputs=Constraint(regex="a" * 101)),
            SamplingParams(structured_outputs=Constraint(choice=["x" * 60, "y" * 60])),
            SamplingParams(max_tokens=3, structured_outputs=Constraint(regex="a" * 100)),
        ],
        use_tqdm=False,
    )
    assert "101 characters" in outs[0].error and "at most 100" in outs[0].error
    assert "122 characters" in outs[1].error  # the choices together, one separator each
    assert outs[2].error is None and re.fullmatch("a+", outs[2].outputs[0].text)
