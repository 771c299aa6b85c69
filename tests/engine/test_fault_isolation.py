"""One request's failure fails that request alone; device and forward failures stay fatal.

Also the boundary checks that keep per-request parameters from breaking a step (top_k beyond the
vocabulary, limits beyond int32).
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from kestrel import LLM, SamplingParams
from kestrel.sample import Sampler
from tests.engine.helpers import prompts_of

NUM_BLOCKS = 512
VOCAB = 512  # the tiny models' vocabulary
MARK = 0.125  # the faulty request's logit_bias value, which the injected sampling fault spots


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir("qwen2"), block_size=4, num_kv_blocks=NUM_BLOCKS)


PROMPTS = prompts_of([9, 14, 6], seed=40)
GREEDY = SamplingParams(temperature=0, max_tokens=10, logprobs=2, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
# Not plain greedy (logit_bias), so its row goes through the sampler with the others.
FAULTY = SamplingParams(temperature=0, max_tokens=10, logit_bias={5: MARK}, ignore_eos=True)


def _run(engine, requests, *, setup=None):
    """Adds `requests` {id: (prompt, params)} together, runs them to the end and returns the
    final output of each. `setup(engine)` runs after the requests are added."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    if setup is not None:
        setup(engine)
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                assert out.request_id not in finals
                finals[out.request_id] = out
    return finals


def _healthy(tag):
    return {f"greedy-{tag}": (PROMPTS[0], GREEDY), f"seeded-{tag}": (PROMPTS[1], SEEDED)}


def _assert_same_completions(got, ref):
    assert got.error is None and ref.error is None
    for c, r in zip(got.outputs, ref.outputs, strict=True):
        assert c.token_ids == r.token_ids
        assert c.finish_reason == r.finish_reason == "length"
        assert c.text == r.text
        if r.logprobs is None:
            assert c.logprobs is None
            continue
        assert len(c.logprobs) == len(r.logprobs)
        for entry, ref_entry in zip(c.logprobs, r.logprobs):
            assert entry.keys() == ref_entry.keys()
            for t, lp in entry.items():
                assert lp.rank == ref_entry[t].rank
                assert math.isclose(lp.logprob, ref_entry[t].logprob, rel_tol=1e-5, abs_tol=1e-6)


def _assert_no_leak(engine):
    assert not engine.has_unfinished_requests()
    stats = engine.stats()
    assert stats["num_free_blocks"] == NUM_BLOCKS
    assert stats["kv_cache_usage"] == 0.0
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0
    assert not engine._seqs


def _assert_failed(out, stage, message):
    assert out.finished
    assert out.error == f"{message} (this request's {stage} failed)"
    assert all(c.finish_reason == "error" for c in out.outputs)


def _inject_sampling_fault(monkeypatch, is_faulty, make_exc=None):
    """Sampler calls whose batch holds a faulty row raise; returns the list of raised faults."""
    real_call = Sampler.__call__
    raised = []

    def call(self, logits, batch):
        if is_faulty(batch):
            exc = make_exc() if make_exc is not None else ValueError("injected sampling fault")
            raised.append(exc)
            raise exc
        return real_call(self, logits, batch)

    monkeypatch.setattr(Sampler, "__call__", call)
    return raised


def _has_mark(batch):
    return batch.logit_bias_values is not None and bool((batch.logit_bias_values == MARK).any())


@pytest.fixture(scope="module")
def reference(llm):
    """The healthy requests' outputs in a run without the faulty one."""
    finals = _run(llm.engine, _healthy("ref"))
    return {k.split("-")[0]: v for k, v in finals.items()}


def _check_healthy(finals, tag, reference):
    _assert_same_completions(finals[f"greedy-{tag}"], reference["greedy"])
    _assert_same_completions(finals[f"seeded-{tag}"], reference["seeded"])


def _check_engine_still_runs(llm, reference, tag):
    finals = _run(llm.engine, _healthy(tag))
    _check_healthy(finals, tag, reference)
    _assert_no_leak(llm.engine)


# ---- boundary checks ----------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [VOCAB + 1, 2**31, 2**40])
def test_top_k_beyond_the_vocabulary_is_rejected(llm, top_k):
    engine = llm.engine
    params = SamplingParams(temperature=1.0, top_k=top_k)
    expected = re.escape(
        f"top_k={top_k} is out of range; allowed: -1 or 0 (disabled) or 1..{VOCAB}"
    )
    with pytest.raises(ValueError, match=expected):
        engine.add_request("big-top-k", [5, 6, 7], params)
    with pytest.raises(ValueError, match=expected):  # greedy rows are checked as well
        engine.add_request("big-top-k", [5, 6, 7], params.clone(temperature=0))
    assert not engine.has_unfinished_requests()
    assert engine.stats()["num_waiting"] == 0
    engine.add_request("big-top-k", [5, 6, 7], SamplingParams(max_tokens=1))  # the id is free
    while engine.has_unfinished_requests():
        engine.step()
    _assert_no_leak(engine)


def test_top_k_equal_to_the_vocabulary_samples_as_disabled(llm):
    prompts = prompts_of([7, 12], seed=41)
    base = SamplingParams(temperature=1.0, seed=77, max_tokens=12, ignore_eos=True)
    runs = [
        llm.generate(prompts, base.clone(top_k=top_k), use_tqdm=False) for top_k in (VOCAB, 0, -1)
    ]
    ids = [[o.outputs[0].token_ids for o in run] for run in runs]
    assert ids[0] == ids[1] == ids[2]
    assert len(ids[0][0]) == 12


def test_limits_beyond_int32_run_to_the_context_limit(tiny_model_dir):
    small = LLM(tiny_model_dir("qwen2"), block_size=4, num_kv_blocks=64, max_model_len=24)
    params = SamplingParams(temperature=0, max_tokens=2**40, min_tokens=2**35)
    out = small.generate([[5, 6, 7, 8]], params, use_tqdm=False)[0]
    assert out.error is None
    assert out.outputs[0].finish_reason == "length"
    assert len(out.outputs[0].token_ids) == 24 - 4
    assert small.engine.stats()["num_free_blocks"] == 64


# ---- a sampling fault of one row ----------------------------------------------------------


def test_sampling_fault_fails_only_its_request(llm, reference, monkeypatch):
    engine = llm.engine
    raised = _inject_sampling_fault(monkeypatch, _has_mark)
    requests = {**_healthy("s"), "faulty-s": (PROMPTS[2], FAULTY)}
    finals = _run(engine, requests)
    # The batch raised, then the faulty row alone: its request failed at its first step.
    assert len(raised) == 2
    bad = finals["faulty-s"]
    _assert_failed(bad, "sampling", "ValueError: injected sampling fault")
    assert bad.outputs[0].token_ids == []
    _check_healthy(finals, "s", reference)
    _assert_no_leak(engine)
    _check_engine_still_runs(llm, reference, "s-after")


def test_bad_row_caught_by_the_batch_build_fails_only_its_request(llm, reference):
    """No injection: a parameter that got past the engine's checks (here corrupted after
    add_request) makes SamplingBatch.build raise, and only that request fails."""
    engine = llm.engine
    params = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)

    def corrupt(engine):
        engine._requests["corrupt"].params.logit_bias[10**6] = 1.0

    finals = _run(engine, {**_healthy("c"), "corrupt": (PROMPTS[2], params)}, setup=corrupt)
    expected = "ValueError: row 0: logit_bias has token id 1000000; allowed: [0, 511]"
    _assert_failed(finals["corrupt"], "sampling", f"{expected} (vocab_size = {VOCAB})")
    _check_healthy(finals, "c", reference)
    _assert_no_leak(engine)


def test_sampling_fault_later_in_the_request(llm, reference, monkeypatch):
    """The faulty row fails at its 4th token, in decode steps shared with the others."""
    engine = llm.engine
    calls = {"n": 0}

    def is_faulty(batch):
        if not _has_mark(batch):
            return False
        calls["n"] += 1
        return calls["n"] >= 4

    _inject_sampling_fault(monkeypatch, is_faulty)
    finals = _run(engine, {**_healthy("late"), "faulty-late": (PROMPTS[2], FAULTY)})
    bad = finals["faulty-late"]
    _assert_failed(bad, "sampling", "ValueError: injected sampling fault")
    assert len(bad.outputs[0].token_ids) == 3
    _check_healthy(finals, "late", reference)
    _assert_no_leak(engine)


def test_sampling_fault_of_a_lone_request_fails_it(llm, reference, monkeypatch):
    engine = llm.engine
    _inject_sampling_fault(monkeypatch, _has_mark)
    finals = _run(engine, {"alone": (PROMPTS[2], FAULTY)})
    _assert_failed(finals["alone"], "sampling", "ValueError: injected sampling fault")
    _assert_no_leak(engine)
    _check_engine_still_runs(llm, reference, "alone-after")


def test_every_row_failing_is_fatal(llm, reference, monkeypatch):
    engine = llm.engine
    raised = _inject_sampling_fault(monkeypatch, lambda batch: True)
    engine.add_request("all-1", PROMPTS[0], SEEDED)
    engine.add_request("all-2", PROMPTS[1], FAULTY)
    with pytest.raises(ValueError, match="injected sampling fault") as info:
        engine.step()
    assert info.value is raised[0]  # the batch's own exception, not a row's
    assert len(raised) == 3  # the batch, then each row alone
    _assert_no_leak(engine)  # the existing fatal path aborted both
    monkeypatch.undo()
    _check_engine_still_runs(llm, reference, "all-after")


@pytest.mark.parametrize(
    "make_exc",
    [
        lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        lambda: RuntimeError("CUDA error: device-side assert triggered"),
    ],
    ids=["oom", "cuda-error"],
)
def test_device_failure_in_sampling_is_fatal(llm, reference, monkeypatch, make_exc):
    engine = llm.engine
    raised = _inject_sampling_fault(monkeypatch, _has_mark, make_exc)
    for request_id, (prompt, params) in {
        **_healthy("dev"),
        "faulty-dev": (PROMPTS[2], FAULTY),
    }.items():
        engine.add_request(request_id, prompt, params)
    with pytest.raises(RuntimeError) as info:
        engine.step()
    assert info.value is raised[0]
    assert len(raised) == 1  # no row-by-row retry after a device failure
    _assert_no_leak(engine)  # every request of the step was aborted
    monkeypatch.undo()
    _check_engine_still_runs(llm, reference, "dev-after")


def test_forward_failure_is_fatal(llm, reference, monkeypatch):
    engine = llm.engine

    def failing_logits(out, prompt_rows):
        raise ValueError("injected forward failure")

    monkeypatch.setattr(engine.runner, "_logits", failing_logits)
    for request_id, (prompt, params) in _healthy("fwd").items():
        engine.add_request(request_id, prompt, params)
    with pytest.raises(ValueError, match="injected forward failure"):
        engine.step()
    _assert_no_leak(engine)
    monkeypatch.undo()
    _check_engine_still_runs(llm, reference, "fwd-after")


def test_n2_sampling_fault_in_one_sample_fails_the_request(llm, reference, monkeypatch):
    engine = llm.engine
    bad_params = SamplingParams(n=2, temperature=1.0, seed=99, max_tokens=10, ignore_eos=True)
    target = {}

    def setup(engine):
        target["generator"] = engine._requests["faulty-n2"].seqs[1].row.generator
        assert target["generator"] is not None

    def is_faulty(batch):
        return any(g is target["generator"] for g in batch.generators)

    _inject_sampling_fault(monkeypatch, is_faulty)
    requests = {**_healthy("n2"), "faulty-n2": (PROMPTS[2], bad_params)}
    finals = _run(engine, requests, setup=setup)
    bad = finals["faulty-n2"]
    _assert_failed(bad, "sampling", "ValueError: injected sampling fault")
    assert [c.index for c in bad.outputs] == [0, 1]
    assert [c.token_ids for c in bad.outputs] == [[], []]  # the healthy sample went with it
    _check_healthy(finals, "n2", reference)
    _assert_no_leak(engine)


# ---- a host-processing fault of one sequence ----------------------------------------------


def _break_detokenizer(request_id, sample, at_call, exc=None):
    """setup(): the detokenizer of `request_id`'s sample raises at its `at_call`-th call."""

    def setup(engine):
        detok = engine._requests[request_id].seqs[sample].detokenizer
        real_add_tokens = detok.add_tokens
        calls = {"n": 0}

        def add_tokens(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == at_call:
                raise exc if exc is not None else RuntimeError("injected detokenizer fault")
            return real_add_tokens(*args, **kwargs)

        detok.add_tokens = add_tokens

    return setup


@pytest.mark.parametrize("at_call", [3, 10])
def test_detokenizer_fault_fails_only_its_request(llm, reference, at_call):
    """at_call 10: the fault meets the token that also finishes the sequence in the core."""
    engine = llm.engine
    plain = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    tag = f"d{at_call}"
    requests = {**_healthy(tag), f"faulty-{tag}": (PROMPTS[2], plain)}
    finals = _run(engine, requests, setup=_break_detokenizer(f"faulty-{tag}", 0, at_call=at_call))
    bad = finals[f"faulty-{tag}"]
    _assert_failed(bad, "output processing", "RuntimeError: injected detokenizer fault")
    # The token that met the fault is kept; the text holds what was decoded before it.
    assert len(bad.outputs[0].token_ids) == at_call
    _check_healthy(finals, tag, reference)
    _assert_no_leak(engine)
    _check_engine_still_runs(llm, reference, f"{tag}-after")


@pytest.mark.parametrize("failing_sample", [0, 1])
def test_n2_detokenizer_fault_in_one_sample_fails_the_request(llm, reference, failing_sample):
    engine = llm.engine
    params = SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=10, ignore_eos=True)
    requests = {**_healthy(f"dn{failing_sample}"), "faulty-dn": (PROMPTS[2], params)}
    setup = _break_detokenizer("faulty-dn", failing_sample, at_call=2, exc=KeyError("boom"))
    finals = _run(engine, requests, setup=setup)
    bad = finals["faulty-dn"]
    _assert_failed(bad, "output processing", "KeyError: 'boom'")
    assert len(bad.outputs) == 2
    assert len(bad.outputs[failing_sample].token_ids) == 2
    _check_healthy(finals, f"dn{failing_sample}", reference)
    _assert_no_leak(engine)


def test_offline_generate_returns_the_failed_output(llm, reference, monkeypatch):
    _inject_sampling_fault(monkeypatch, _has_mark)
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[1]]
    outs = llm.generate(prompts, [GREEDY, FAULTY, SEEDED], use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == prompts
    _assert_failed(outs[1], "sampling", "ValueError: injected sampling fault")
    _assert_same_completions(outs[0], reference["greedy"])
    _assert_same_completions(outs[2], reference["seeded"])
    _assert_no_leak(llm.engine)
