"""Draft-model speculation in the engine (tiny models, CPU) against the engine without it.

The key check is a draft equal to the target (same weights): in greedy mode its k drafts are
exactly the target's next k tokens whenever the draft's KV cache holds what the target's does,
so (nearly) every draft is accepted and the mean acceptance length is about k + 1; a stale or
misplaced draft KV entry would show as rejected drafts. That holds with chunked prefill (a
32-token budget), prefix caching (shared spans) and preemption (48 blocks of 4 tokens) mixed
in. A draft with other random weights leaves the target's outputs unchanged with low acceptance.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kestrel import LLM, SamplingParams
from kestrel.config import ConfigError, EngineConfig
from kestrel.testing.tiny_models import make_tiny_model
from tests.engine.helpers import prompts_of
from tests.engine.test_overlap_scheduling import (
    NUM_BLOCKS,
    assert_same,
    make_params,
    params_strategy,
    run_streaming,
)
from tests.engine.test_spec_decode import repetitive_prompts

ARCH = "qwen2"
K = 4
_serial = itertools.count()


@pytest.fixture(scope="module")
def other_draft_dir(tmp_path_factory):
    """The target's shape and tokenizer, other random weights."""
    path = tmp_path_factory.mktemp("draft-other")
    make_tiny_model(path, ARCH, seed=123, tie_word_embeddings=True, num_layers=1)
    return str(path)


def spec_of(model: str, k: int = K, **kw) -> dict:
    return {"method": "draft_model", "model": model, "num_speculative_tokens": k, **kw}


def make_llm(model: str, spec, **kw) -> LLM:
    kw.setdefault("num_kv_blocks", NUM_BLOCKS)  # small: long batches preempt
    kw.setdefault("max_num_batched_tokens", 32)  # chunked prefill
    return LLM(model, block_size=4, speculative_config=spec, **kw)


@pytest.fixture(scope="module")
def engines(tiny_model_dir, other_draft_dir):
    target = tiny_model_dir(ARCH)
    return {
        "plain": make_llm(target, None),
        "self": make_llm(target, spec_of(target)),
        "other": make_llm(target, spec_of(other_draft_dir, k=3)),
    }


def counters(engine) -> tuple[int, int, int]:
    s = engine.stats()
    keys = ("spec_decode_num_drafts", "spec_decode_num_draft_tokens")
    return (*(s[k] for k in keys), s["spec_decode_num_accepted_tokens"])


def run_both(engines, name, requests):
    before = counters(engines[name].engine)
    spec = run_streaming(engines[name], requests)
    after = counters(engines[name].engine)
    plain = run_streaming(engines["plain"], requests)
    for rid in requests:
        assert_same(spec[rid], plain[rid])
    return tuple(b - a for a, b in zip(before, after))


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def test_the_target_as_its_own_draft_accepts_every_draft(engines):
    """Greedy, 6 prompts at once: chunked prefill, shared spans (prefix hits) and preemption
    (48 blocks are too few for all of them) happen on the way."""
    prompts = repetitive_prompts([12, 30, 7], seed=1) + prompts_of([45, 20, 3], seed=1)
    tag = next(_serial)
    requests = {f"a{tag}-{i}": (p, greedy(40, ignore_eos=True)) for i, p in enumerate(prompts)}
    before = engines["self"].engine.stats()
    drafts, draft_tokens, accepted = run_both(engines, "self", requests)
    after = engines["self"].engine.stats()
    assert after["num_preemptions"] > before["num_preemptions"]
    assert after["prefix_hit_tokens"] > before["prefix_hit_tokens"]
    assert drafts > 20 and draft_tokens >= 3 * drafts
    assert accepted >= 0.97 * draft_tokens
    # Drafts are trimmed near max_tokens only: the mean acceptance length is close to k + 1.
    assert 1 + accepted / drafts >= K + 0.5


def test_a_stale_draft_cache_would_be_caught(tiny_model_dir):
    """The test above can fail: without the draft's pass over the target's rows its KV is
    never written outside the chain, and the drafts are mostly wrong (measured: 14% accepted;
    with the pass, 100%). Random prompts, and drafting never switched off."""
    target = tiny_model_dir(ARCH)
    llm = make_llm(target, spec_of(target, min_acceptance_rate=0), num_kv_blocks=256)
    llm.engine._drafter.mirror = lambda step: None
    prompts = prompts_of([30, 45, 20, 12], seed=1)
    llm.generate(prompts, greedy(30, ignore_eos=True), use_tqdm=False)
    _, draft_tokens, accepted = counters(llm.engine)
    assert draft_tokens > 0 and accepted < 0.5 * draft_tokens


def _staggered(llm, max_tokens=(12, 24, 60)):
    """Three greedy requests ending at different steps: with disable_by_batch_size=1 nothing
    is drafted until one is left, whose draft KV then lags by the decodes it skipped."""
    prompts = prompts_of([20, 33, 27], seed=4)
    params = [greedy(n, ignore_eos=True) for n in max_tokens]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("max_catch_up", [8192, 3])
def test_a_lagging_draft_cache_catches_up(tiny_model_dir, engines, max_catch_up):
    """Decode rows of sequences that do not draft are left out of the draft's pass; the chain
    catches up over them when drafting resumes (all at once, or 3 rows per step), so the target
    as its own draft still accepts every draft, and the outputs are the plain engine's."""
    target = tiny_model_dir(ARCH)
    llm = make_llm(target, spec_of(target, disable_by_batch_size=1), num_kv_blocks=256)
    llm.engine._drafter.max_catch_up_tokens = max_catch_up
    mirrored = []
    mirror = llm.engine._drafter.mirror
    llm.engine._drafter.mirror = lambda step: (mirrored.append(step.num_tokens), mirror(step))
    assert _staggered(llm) == _staggered(engines["plain"])
    drafts, draft_tokens, accepted = counters(llm.engine)
    assert llm.engine.stats()["spec_decode_num_skipped_steps"] > 10
    assert drafts > 5 and accepted == draft_tokens
    # Plain decode steps of three sequences are not mirrored at all: fewer passes than steps.
    assert len(mirrored) < llm.engine.stats()["num_steps"] - 10


def test_without_the_catch_up_the_lag_would_show(tiny_model_dir):
    """The test above can fail: a chain that trusts the stale draft KV drafts worse."""
    target = tiny_model_dir(ARCH)
    llm = make_llm(
        target, spec_of(target, disable_by_batch_size=1, min_acceptance_rate=0), num_kv_blocks=256
    )
    kv = llm.engine._speculator.draft_kv
    kv.start_of = lambda seq_id, num_tokens: num_tokens - 1
    _staggered(llm, max_tokens=(12, 40, 90))
    _, draft_tokens, accepted = counters(llm.engine)
    assert draft_tokens > 0 and accepted < 0.7 * draft_tokens


def test_a_draft_with_other_weights_changes_no_output(engines):
    prompts = repetitive_prompts([12, 30, 7, 45, 20, 3], seed=2)
    tag = next(_serial)
    requests = {f"o{tag}-{i}": (p, greedy(40, ignore_eos=True)) for i, p in enumerate(prompts)}
    drafts, draft_tokens, accepted = run_both(engines, "other", requests)
    assert drafts > 0 and accepted < 0.3 * draft_tokens


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    params=st.lists(params_strategy, min_size=6, max_size=6),
    seed=st.integers(0, 2**16),
    name=st.sampled_from(["self", "other"]),
)
def test_mixed_requests_give_the_same_outputs(engines, lengths, params, seed, name):
    """Greedy and seeded sampling, n > 1, stop strings and ids, EOS, penalties, logprobs."""
    prompts = repetitive_prompts(lengths, seed)
    tag = next(_serial)
    requests = {
        f"m{tag}-{i}": (prompt, make_params(params[i], seed + i))
        for i, prompt in enumerate(prompts)
    }
    run_both(engines, name, requests)


@pytest.mark.parametrize(
    "extra",
    [{}, {"top_k": 20, "top_p": 0.9}, {"repetition_penalty": 1.2, "min_tokens": 10}, {"n": 2}],
    ids=["plain", "filters", "penalties-mintokens", "n2"],
)
def test_seeded_sampling_is_the_same_with_a_draft_model(engines, extra):
    """The greedy draft is a one-hot q: each verify row samples the target as plain sampling
    would (rejection sampling with one-hot q), so seeded requests reproduce exactly."""
    prompts = repetitive_prompts([14, 30, 22], seed=3)
    tag = next(_serial)
    requests = {
        f"s{tag}-{i}": (
            p,
            SamplingParams(temperature=0.3, seed=1000 + i, max_tokens=32, ignore_eos=True, **extra),
        )
        for i, p in enumerate(prompts)
    }
    drafts, draft_tokens, accepted = run_both(engines, "self", requests)
    assert drafts > 0 and 0 < accepted <= draft_tokens


def test_the_draft_cache_costs_blocks(tiny_model_dir):
    """Memory planning counts both models' bytes per block (CPU: the kv_cache_memory_gib
    budget), less the chain's scratch blocks."""
    from kestrel.runner.model_runner import kv_block_bytes

    target = tiny_model_dir(ARCH)
    gib = 0.0015  # about 780 blocks of the tiny model, under max_num_seqs' need
    plain = LLM(target, block_size=4, kv_cache_memory_gib=gib, max_num_seqs=8)
    draft = LLM(
        target,
        block_size=4,
        kv_cache_memory_gib=gib,
        max_num_seqs=8,
        speculative_config=spec_of(target),
    )
    per_block = kv_block_bytes(plain.engine.model_config, 4, plain.engine.dtype)
    drafter = draft.engine._drafter
    assert drafter.block_bytes() == per_block  # the same model
    budget = int(gib * (1 << 30))
    assert plain.engine.num_kv_blocks == budget // per_block
    expected = (budget - drafter.num_scratch_blocks * per_block) // (2 * per_block)
    assert draft.engine.num_kv_blocks == expected
    assert drafter.runner.kv_caches[0][0].shape[0] == expected + drafter.num_scratch_blocks


def test_a_vocabulary_mismatch_is_refused(tiny_model_dir, tmp_path):
    target = tiny_model_dir(ARCH)
    bigger = make_tiny_model(tmp_path / "big", ARCH, vocab_size=600, tie_word_embeddings=True)
    with pytest.raises(ValueError, match=r"vocab_size=600, the target 512"):
        make_llm(target, spec_of(str(bigger)))
    tokens = len(make_llm(target, None).engine.tokenizer)
    small = make_tiny_model(
        tmp_path / "small", ARCH, vocab_size=tokens - 1, tie_word_embeddings=True,
        with_tokenizer=False,
    )  # fmt: skip
    with pytest.raises(
        ValueError,
        match=rf"vocab_size={tokens - 1}, the target 512 \(the target's tokenizer has {tokens} tokens\)",
    ):
        make_llm(target, spec_of(str(small)))
    padded = make_tiny_model(
        tmp_path / "padded", ARCH, vocab_size=tokens, tie_word_embeddings=True, with_tokenizer=False
    )  # covers the tokenizer: accepted (Qwen2.5-7B / 0.5B pad their embeddings differently)
    llm = make_llm(target, spec_of(str(padded)))
    assert llm.engine._drafter.vocab_size == tokens


def test_tensor_parallel_with_a_draft_model_is_refused(tiny_model_dir):
    target = tiny_model_dir(ARCH)
    with pytest.raises(ValueError, match="draft_model' with tensor_parallel_size=2"):
        LLM(target, tensor_parallel_size=2, speculative_config=spec_of(target))


@pytest.mark.parametrize(
    "value, match",
    [
        ({"method": "draft_model", "num_speculative_tokens": 2}, r"model = None is invalid"),
        (spec_of(""), r"model = '' is invalid"),
        ({"method": "draft_model", "model": "m"}, "needs 'num_speculative_tokens'"),
        (spec_of("m", prompt_lookup_max=3), r"unknown keys \['prompt_lookup_max'\] for method"),
        (spec_of("m", draft_tensor_parallel_size=2), "draft_tensor_parallel_size = 2 is invalid"),
        ({"method": "draft", "model": "m"}, "method = 'draft' is not supported"),
        (
            {"method": "ngram", "num_speculative_tokens": 2, "model": "m"},
            r"unknown keys \['model'\]",
        ),
    ],
)
def test_bad_draft_configs_are_refused(value, match):
    with pytest.raises(ConfigError, match=match) as e:
        EngineConfig(speculative_config=value)
    assert e.value.field == "speculative_config"


def test_a_config_naming_only_a_model_means_draft_model():
    from kestrel.spec.config import SpeculativeConfig

    c = SpeculativeConfig.parse({"model": "m", "num_speculative_tokens": 3})
    assert (c.method, c.model, c.num_speculative_tokens) == ("draft_model", "m", 3)


def test_a_stop_string_inside_a_run_that_update_finished(engines):
    """The target as its own draft accepts whole runs (the prefill's token, then k + 1 per
    step): a stop string completing inside the run that also reaches max_tokens ends the
    request at the stop string; update() has finished it already (at max_tokens), which the
    engine must not finish a second time (regression: that raised in output processing)."""
    tokenizer = engines["plain"].engine.tokenizer
    stop_at = 2 + K  # inside the second run (tokens 1 + K + 1 .. 2 * K + 2 are run 2)
    for seed in range(40):
        prompt = prompts_of([16], seed=100 + seed)[0]
        ids = engines["plain"].generate([prompt], greedy(2 * K + 2, ignore_eos=True))[0]
        ids = ids.outputs[0].token_ids
        text = tokenizer.decode(ids[: stop_at + 1])
        complete = text.strip() and "\ufffd" not in text  # no partial UTF-8 held back
        if complete and text != tokenizer.decode(ids[:stop_at]):
            break
    else:
        pytest.skip("no prompt whose stop string completes at the chosen token")
    params = greedy(2 * K + 2, ignore_eos=True, stop=[text])
    requests = {f"ss{next(_serial)}": (prompt, params)}
    run_both(engines, "self", requests)
    out = run_streaming(engines["self"], {f"ss{next(_serial)}": (prompt, params)})
    ((final, _),) = out.values()
    assert final.error is None and final.outputs[0].finish_reason == "stop"
    assert final.outputs[0].text == ""  # the stop string is the whole text, not included


def test_mirrors_through_the_drafts_piecewise_pieces(tiny_model_dir, monkeypatch):
    """The draft's mirror of verify / prefill rows through its piecewise pieces (run eagerly
    here, as the CUDA graphs replay them) keeps its cache exact: the target as its own draft
    still accepts every draft, and the pieces did run."""
    from kestrel.runner.piecewise_graphs import PiecewiseGraphs

    target = tiny_model_dir(ARCH)
    llm = make_llm(target, spec_of(target))
    llm.engine._drafter.runner.capture_piecewise_graphs(24, use_graphs=False)
    calls = []
    real = PiecewiseGraphs.run

    def spy(graphs, input_ids, positions, metadata):
        calls.append(int(input_ids.shape[0]))
        return real(graphs, input_ids, positions, metadata)

    monkeypatch.setattr(PiecewiseGraphs, "run", spy)
    prompts = repetitive_prompts([12, 30], seed=2) + prompts_of([20, 9], seed=2)
    tag = next(_serial)
    requests = {f"pw{tag}-{i}": (p, greedy(32, ignore_eos=True)) for i, p in enumerate(prompts)}
    before = counters(llm.engine)
    spec = run_streaming(llm, requests)
    plain = run_streaming(make_llm(target, None), requests)
    for rid in requests:
        assert_same(spec[rid], plain[rid])
    drafts, draft_tokens, accepted = (b - a for a, b in zip(before, counters(llm.engine)))
    assert calls and drafts > 10
    assert accepted >= 0.97 * draft_tokens
