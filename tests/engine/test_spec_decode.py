"""Greedy n-gram speculation in the engine against the same engine without it.

Greedy outputs must be identical token for token (text, finish and stop reasons too), with
chunked prefill (a 32-token budget), prefix caching (shared prompt prefixes), preemption (48
blocks of 4 tokens), EOS, stop strings and stop ids, and requests that cannot speculate
(seeded sampling, penalties, logprobs) mixed in; prompts repeat themselves so drafts are
accepted, and the acceptance counters say so.
"""

from __future__ import annotations

import itertools
import logging
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kestrel import LLM, SamplingParams
from kestrel.config import ConfigError, EngineConfig
from tests.engine.test_overlap_scheduling import (
    NUM_BLOCKS,
    assert_same,
    make_params,
    params_strategy,
    run_streaming,
)

ARCH = "qwen2"
SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}
_serial = itertools.count()


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    def make(spec) -> LLM:
        return LLM(
            tiny_model_dir(ARCH),
            block_size=4,
            num_kv_blocks=NUM_BLOCKS,  # small: long batches preempt
            max_num_batched_tokens=32,  # chunked prefill
            speculative_config=spec,
        )

    return {"spec": make(SPEC), "plain": make(None)}


def repetitive_prompts(lengths: list[int], seed: int) -> list[list[int]]:
    """Prompts made of a few repeated spans (some shared between prompts: prefix hits)."""
    rng = random.Random(seed)
    spans = [[rng.randrange(3, 500) for _ in range(rng.randrange(2, 6))] for _ in range(3)]
    prompts = []
    for n in lengths:
        p: list[int] = []
        while len(p) < n:
            p += spans[rng.randrange(len(spans))]
        prompts.append(p[:n])
    return prompts


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def test_greedy_outputs_are_identical_and_drafts_are_accepted(engines):
    prompts = repetitive_prompts([12, 30, 7, 45, 20, 3], seed=1)
    requests = {
        f"g{next(_serial)}-{i}": (p, greedy(40, ignore_eos=True)) for i, p in enumerate(prompts)
    }
    before = engines["spec"].engine.stats()
    spec = run_streaming(engines["spec"], requests)
    plain = run_streaming(engines["plain"], requests)
    for rid in requests:
        assert_same(spec[rid], plain[rid])
        assert len(spec[rid][0].outputs[0].token_ids) == 40
    stats = engines["spec"].engine.stats()
    drafts = stats["spec_decode_num_drafts"] - before["spec_decode_num_drafts"]
    draft_tokens = stats["spec_decode_num_draft_tokens"] - before["spec_decode_num_draft_tokens"]
    accepted = stats["spec_decode_num_accepted_tokens"] - before["spec_decode_num_accepted_tokens"]
    assert drafts > 0 and draft_tokens >= drafts
    assert 0 < accepted <= draft_tokens
    assert "spec_decode_num_drafts" not in engines["plain"].engine.stats()


def test_logprobs_requests_speculate_with_each_tokens_own_logprobs(engines):
    """A request with logprobs speculates too: each accepted token's entry comes from its own
    verify row, so the entries equal those of the plain engine (sampled and top-k alike)."""
    prompts = repetitive_prompts([24, 40, 16], seed=7)
    requests = {
        f"lp{next(_serial)}-{i}": (p, greedy(32, ignore_eos=True, logprobs=3))
        for i, p in enumerate(prompts)
    }
    before = engines["spec"].engine.stats()["spec_decode_num_accepted_tokens"]
    spec = run_streaming(engines["spec"], requests)
    plain = run_streaming(engines["plain"], requests)
    for rid in requests:
        assert_same(spec[rid], plain[rid])
        assert len(spec[rid][0].outputs[0].logprobs) == 32
    assert engines["spec"].engine.stats()["spec_decode_num_accepted_tokens"] > before


def test_speculation_takes_fewer_steps(engines):
    """A prompt that repeats one span: the tiny model's greedy continuation tends to loop, and
    every accepted draft is a step saved."""
    prompt = [11, 12, 13, 14] * 6
    steps = {}
    for name, llm in engines.items():
        engine = llm.engine
        engine.add_request(f"s{next(_serial)}", prompt, greedy(48, ignore_eos=True))
        steps[name] = 0
        while engine.has_unfinished_requests():
            engine.step()
            steps[name] += 1
    assert steps["spec"] < steps["plain"]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    params=st.lists(params_strategy, min_size=6, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_mixed_requests_give_the_same_outputs(engines, lengths, params, seed):
    prompts = repetitive_prompts(lengths, seed)
    tag = next(_serial)
    requests = {
        f"m{tag}-{i}": (prompt, make_params(params[i], seed + i))
        for i, prompt in enumerate(prompts)
    }
    spec = run_streaming(engines["spec"], requests)
    plain = run_streaming(engines["plain"], requests)
    for rid in requests:
        assert_same(spec[rid], plain[rid])


@pytest.mark.parametrize(
    "value, match",
    [
        ({"method": "eagle", "num_speculative_tokens": 2}, "method = 'eagle' is not supported"),
        ({"method": "ngram"}, "needs 'num_speculative_tokens'"),
        ({"method": "ngram", "num_speculative_tokens": 0}, r"num_speculative_tokens = 0"),
        (
            {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 9},
            r"prompt_lookup_min = 9 is invalid; allowed: an int in \[1, 5\]",
        ),
        ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"}, "unknown keys"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_speculative_configs_are_refused(value, match):
    with pytest.raises(ConfigError, match=match) as e:
        EngineConfig(speculative_config=value)
    assert e.value.field == "speculative_config"


def test_a_dict_becomes_json_text():
    c = EngineConfig(speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    assert c.speculative_config == '{"method": "ngram", "num_speculative_tokens": 3}'


def test_ngram_speculation_overlaps_only_steps_without_drafts(tiny_model_dir, monkeypatch):
    """With n-gram drafts overlap scheduling stays on: a step is launched ahead only while no
    sequence may draft (here: more sequences than disable_by_batch_size), a drafted step never
    is, and the outputs are the plain engine's."""
    from kestrel.engine.engine_step import EngineStep

    spec = {**SPEC, "disable_by_batch_size": 2}
    llm = LLM(tiny_model_dir(ARCH), block_size=4, num_kv_blocks=96, speculative_config=spec)
    assert llm.engine._speculator is not None and llm.engine._async
    launches = []  # (launched ahead of an in-flight step, drafted)
    real = EngineStep._launch

    def launch(self):
        ahead = self._inflight is not None
        launched = real(self)
        launches.append((ahead, launched.out.total_draft_tokens > 0))
        return launched

    monkeypatch.setattr(EngineStep, "_launch", launch)
    spans = [[11, 12, 13, 14], [200, 201, 5], [77, 78, 79, 80, 81]]
    prompts = [(spans[i % 3] + spans[(i + 1) % 3]) * (2 + i) for i in range(4)]
    lens = [6, 30, 12, 40]  # the batch shrinks from 4 to 1: speculation comes on
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lens]
    outs = llm.generate(prompts, params, use_tqdm=False)
    plain = LLM(tiny_model_dir(ARCH), block_size=4, num_kv_blocks=96)
    assert plain.engine._async and plain.engine._speculator is None
    ref = plain.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]
    assert not any(ahead and drafted for ahead, drafted in launches)
    assert any(ahead for ahead, _ in launches)  # overlapped while the batch was large
    assert any(drafted for _, drafted in launches)  # drafted once it was small


def test_a_draft_model_turns_overlap_scheduling_off(tiny_model_dir, caplog):
    target = tiny_model_dir(ARCH)
    spec = {"method": "draft_model", "model": target, "num_speculative_tokens": 2}
    with caplog.at_level(logging.INFO):
        llm = LLM(target, block_size=4, num_kv_blocks=NUM_BLOCKS, speculative_config=spec)
    assert llm.engine._speculator is not None and not llm.engine._async
    assert "overlap scheduling is off: a draft model" in caplog.text


def test_the_runner_history_follows_every_accepted_token(engines):
    """Accepted drafts give a sequence several tokens in one step: the runner's input-batch
    history (what penalties would read) must hold each of them, in order, for batches past the
    scalar append path too."""
    engine = engines["spec"].engine
    prompts = repetitive_prompts([16, 24, 20, 28, 12, 18], seed=5)
    ids = [f"h{next(_serial)}-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, greedy(30, ignore_eos=True))
    checked = 0
    while engine.has_unfinished_requests():
        engine.step()
        batch = engine.runner.input_batch
        for state, seq in list(engine._seqs.values()):
            if seq.row.slot is not None:
                assert batch.output_token_ids(seq.row.slot) == seq.row.output_token_ids
                checked += 1
    assert checked > 0
    assert engine.stats()["spec_decode_num_accepted_tokens"] > 0
