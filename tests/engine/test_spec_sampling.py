"""Sampled requests (temperature > 0) speculate in the engine (tiny model, CPU).

Seeded requests make the same tokens with and without speculation (the runner rewinds a
request's generator to its last accepted row, and each verify row samples the target given the
drafts before it, penalties and min_tokens included), so every check is exact: outputs, stop
tokens and stop strings landing inside an accepted run, and the acceptance counters. Unseeded
requests draw from the shared generator: only their lengths and counters are checked."""

from __future__ import annotations

import itertools

import pytest

from kestrel import LLM, SamplingParams
from tests.engine.test_overlap_scheduling import NUM_BLOCKS, assert_same, run_streaming
from tests.engine.test_spec_decode import repetitive_prompts

ARCH = "qwen2"
SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}
_serial = itertools.count()


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    def make(spec) -> LLM:
        return LLM(
            tiny_model_dir(ARCH),
            block_size=4,
            num_kv_blocks=NUM_BLOCKS,
            max_num_batched_tokens=64,
            speculative_config=spec,
        )

    return {"spec": make(SPEC), "plain": make(None)}


def sampled(max_tokens: int, seed: int | None, **kw) -> SamplingParams:
    # A low temperature keeps the tiny model's loops likely, so drafts are accepted often.
    kw.setdefault("temperature", 0.3)
    return SamplingParams(max_tokens=max_tokens, seed=seed, ignore_eos=True, **kw)


def counters(engine) -> tuple[int, int, int]:
    s = engine.stats()
    return (
        s["spec_decode_num_drafts"],
        s["spec_decode_num_draft_tokens"],
        s["spec_decode_num_accepted_tokens"],
    )


def run(engines, requests) -> tuple[dict, dict, tuple[int, int, int]]:
    before = counters(engines["spec"].engine)
    spec = run_streaming(engines["spec"], requests)
    after = counters(engines["spec"].engine)
    plain = run_streaming(engines["plain"], requests)
    return spec, plain, tuple(b - a for a, b in zip(before, after))


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"temperature": 0.8, "top_k": 20, "top_p": 0.9},
        {"repetition_penalty": 1.2, "frequency_penalty": 0.3, "presence_penalty": 0.2},
        {"min_p": 0.05, "logit_bias": {17: 2.0}, "min_tokens": 10},
        {"n": 3},
    ],
    ids=["plain", "filters", "penalties", "minp-bias-mintokens", "n3"],
)
def test_seeded_sampling_is_the_same_with_speculation(engines, extra):
    prompts = repetitive_prompts([14, 30, 22, 40], seed=3)
    tag = next(_serial)
    requests = {
        f"s{tag}-{i}": (p, sampled(40, seed=1000 + i, **extra)) for i, p in enumerate(prompts)
    }
    spec, plain, (drafts, draft_tokens, accepted) = run(engines, requests)
    for rid in requests:
        assert_same(spec[rid], plain[rid])
    assert drafts > 0 and 0 < accepted <= draft_tokens


def test_seeded_speculation_is_reproducible(engines):
    prompt = [11, 12, 13, 14] * 6
    outs = []
    for _ in range(2):
        rid = f"r{next(_serial)}"
        outs.append(run_streaming(engines["spec"], {rid: (prompt, sampled(48, seed=7))})[rid])
    assert outs[0][0].outputs[0].token_ids == outs[1][0].outputs[0].token_ids


def test_sampled_speculation_takes_fewer_steps(engines):
    prompt = [11, 12, 13, 14] * 6
    steps = {}
    for name, llm in engines.items():
        engine = llm.engine
        engine.add_request(f"t{next(_serial)}", prompt, sampled(48, seed=5))
        steps[name] = 0
        while engine.has_unfinished_requests():
            engine.step()
            steps[name] += 1
    assert steps["spec"] < steps["plain"]


def accepted_runs(engines, prompt, params) -> list[list[int]]:
    """The tokens each step gave the request in the speculative engine."""
    engine = engines["spec"].engine
    rid = f"u{next(_serial)}"
    engine.add_request(rid, prompt, params)
    runs, seen = [], 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            ids = out.outputs[0].token_ids
            if len(ids) > seen:
                runs.append(ids[seen:])
                seen = len(ids)
    return runs


def test_a_stop_string_inside_an_accepted_run_ends_the_request(engines):
    """A stop string that completes at an accepted draft followed by more tokens in the same
    step: the request ends there (nothing after it, in tokens or text), as without
    speculation. The stop string is the whole text up to that draft, so it cannot occur
    earlier. (A stop token inside a run cannot be set up this way: an accepted n-gram draft
    repeats an earlier token, which would have stopped the request already; the scheduler's
    tests stop drafted runs at random stop tokens, and the mixed tests in test_spec_decode.py
    use stop ids with sampled requests.)"""
    prompt = [11, 12, 13, 14] * 6
    tokenizer = engines["spec"].engine.tokenizer
    for seed in range(9, 20):
        runs = accepted_runs(engines, prompt, sampled(48, seed=seed))
        flat = [t for r in runs for t in r]
        ends = list(itertools.accumulate(len(r) for r in runs))
        inside = [e - len(r) for r, e in zip(runs, ends) if len(r) >= 2]
        texts = [tokenizer.decode(flat[: i + 1]) for i in inside]
        cases = [(i, t) for i, t in zip(inside, texts) if t and t != tokenizer.decode(flat[:i])]
        if cases:
            break
    assert cases, "no accepted draft was followed by more tokens: nothing to test"
    stop_at, stop_string = cases[0]
    rid = f"x{next(_serial)}"
    params = sampled(48, seed=seed, stop=[stop_string])
    speculator = engines["spec"].engine._speculator
    accepted_per_step: list[int] = []
    real_accept = speculator.accept

    def spy(out, sampled_ids):
        tokens, counts = real_accept(out, sampled_ids)
        accepted_per_step.append(len(tokens))  # one request: all its accepted tokens
        return tokens, counts

    speculator.accept = spy
    try:
        spec, plain, _ = run(engines, {rid: (prompt, params)})
    finally:
        del speculator.accept
    assert_same(spec[rid], plain[rid])
    out = spec[rid][0].outputs[0]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_string)
    assert out.token_ids == flat[: stop_at + 1]
    # The last step accepted more tokens than the request kept: it ended inside that run.
    assert sum(accepted_per_step) > len(out.token_ids)


def test_unseeded_sampling_speculates(engines):
    prompts = repetitive_prompts([20, 26], seed=4)
    tag = next(_serial)
    requests = {f"n{tag}-{i}": (p, sampled(30, seed=None)) for i, p in enumerate(prompts)}
    spec, _, (drafts, draft_tokens, accepted) = run(engines, requests)
    assert all(len(spec[r][0].outputs[0].token_ids) == 30 for r in requests)
    assert drafts > 0 and 0 < accepted <= draft_tokens


@pytest.mark.cuda
def test_sampled_speculation_on_cuda_is_reproducible_and_accepts(tiny_model_dir):
    """On the GPU (CUDA generators rewound through their Philox state): the same seed gives the
    same tokens twice, drafts are accepted, and the tokens match plain sampling's (fp32 tiny
    model: the verify rows' logits agree with the decode step's to far below a sampling flip)."""
    prompt = [11, 12, 13, 14] * 6
    params = SamplingParams(
        temperature=0.3, seed=7, max_tokens=48, ignore_eos=True, repetition_penalty=1.1
    )
    outputs = {}
    for name, spec in (("spec", SPEC), ("plain", None)):
        llm = LLM(tiny_model_dir(ARCH), device="cuda", dtype="float32", speculative_config=spec)
        runs = [llm.generate([prompt], params, use_tqdm=False)[0] for _ in range(2)]
        outputs[name] = [r.outputs[0].token_ids for r in runs]
        if spec is not None:
            assert llm.engine.stats()["spec_decode_num_accepted_tokens"] > 0
    assert outputs["spec"][0] == outputs["spec"][1] and len(outputs["spec"][0]) == 48
    assert outputs["spec"][0] == outputs["plain"][0]
