"""Engine-level sampling, logprobs, n > 1, stop strings, streaming, chat, errors and abort."""

import math

import pytest
import torch

from kestrel import LLM, SamplingParams
from tests.engine.helpers import prompts_of


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir("qwen2"), block_size=4, num_kv_blocks=512)


def _ids(outputs):
    return [c.token_ids for o in outputs for c in o.outputs]


def test_seeded_requests_reproduce_regardless_of_batch(llm):
    p = prompts_of([9, 4, 13, 21], seed=10)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([p[0]], seeded, use_tqdm=False)
    others = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    mixed = llm.generate([p[1], p[0], p[2], p[3]], [others, seeded, others, others], use_tqdm=False)
    assert _ids(alone)[0] == mixed[1].outputs[0].token_ids
    unseeded = llm.generate([p[0]] * 4, others, use_tqdm=False)
    assert len({tuple(t) for t in _ids(unseeded)}) > 1  # really random without a seed


def test_top_k_one_equals_greedy(llm):
    p = prompts_of([7, 19], seed=11)
    greedy = llm.generate(
        p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False
    )
    topk1 = llm.generate(
        p, SamplingParams(temperature=0.8, top_k=1, max_tokens=12, ignore_eos=True), use_tqdm=False
    )
    assert _ids(greedy) == _ids(topk1)


def test_logprobs_match_transformers(llm, hf_greedy):
    prompt = prompts_of([11], seed=12)[0]
    out = llm.generate(
        [prompt],
        SamplingParams(temperature=0, max_tokens=6, logprobs=3, ignore_eos=True),
        use_tqdm=False,
    )[0]
    completion = out.outputs[0]
    model = hf_greedy.model("qwen2")
    seq = prompt + completion.token_ids
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0].float()
    ref = torch.log_softmax(logits, dim=-1)
    assert len(completion.logprobs) == 6
    for i, (tok, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert math.isclose(entry[tok].logprob, float(row[tok]), rel_tol=1e-4, abs_tol=1e-5)
        top = torch.topk(row, 3)
        ranked = sorted((lp.rank, t) for t, lp in entry.items() if lp.rank is not None)
        assert [t for _, t in ranked] == top.indices.tolist()
        assert entry[tok].rank == 1  # greedy picks the top token


def test_n_samples_share_prompt_blocks(llm):
    prompt = prompts_of([21], seed=13)[0]
    before = llm.engine.stats()["prefix_hit_tokens"]
    out = llm.generate(
        [prompt],
        SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True),
        use_tqdm=False,
    )[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    # The first sample computes the prompt; the other three reuse its 5 full blocks (20 tokens).
    assert llm.engine.stats()["prefix_hit_tokens"] - before >= 3 * 20


def test_stop_string_ends_the_text(llm):
    prompt = prompts_of([8], seed=14)[0]
    base = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False
    )[0].outputs[0]
    text = base.text
    assert len(text) > 12
    stop = text[6:9]
    cut = text.index(stop)
    got = llm.generate(
        [prompt],
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]),
        use_tqdm=False,
    )[0].outputs[0]
    assert got.text == text[:cut]
    assert got.finish_reason == "stop" and got.stop_reason == stop
    assert len(got.token_ids) < 24
    incl = llm.generate(
        [prompt],
        SamplingParams(
            temperature=0,
            max_tokens=24,
            ignore_eos=True,
            stop=[stop],
            include_stop_str_in_output=True,
        ),
        use_tqdm=False,
    )[0].outputs[0]
    assert incl.text == text[: cut + len(stop)]


def test_stop_token_ids_and_eos(llm):
    prompt = prompts_of([8], seed=15)[0]
    base = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False
    )[0].outputs[0]
    stop_tok = base.token_ids[4]
    first = base.token_ids.index(stop_tok)
    got = llm.generate(
        [prompt],
        SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop_tok]),
        use_tqdm=False,
    )[0].outputs[0]
    assert got.token_ids == base.token_ids[: first + 1]
    assert got.finish_reason == "stop" and got.stop_reason == stop_tok


def test_streaming_deltas_add_up(llm):
    engine = llm.engine
    prompt = prompts_of([5], seed=16)[0]
    engine.add_request(
        "stream", prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    )
    text, ids, final = "", [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            text += out.outputs[0].text_delta
            ids += out.outputs[0].token_ids_delta
            final = out
    assert final.finished
    assert text == final.outputs[0].text
    assert ids == final.outputs[0].token_ids and len(ids) == 20
    assert final.metrics.first_token_time >= final.metrics.arrival_time


def test_chat_renders_the_template_like_transformers(llm, tiny_model_dir):
    from transformers import AutoTokenizer

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    hf_tok = AutoTokenizer.from_pretrained(tiny_model_dir("qwen2"))
    text = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = hf_tok.encode(text, add_special_tokens=False)
    assert "<|im_start|>assistant" in text
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    assert out.prompt_token_ids == list(expected)


def test_bad_input_raises_and_leaves_engine_usable(llm):
    engine = llm.engine
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="out of range"):
        llm.generate([[1, 99999]], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([[5] * 600], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="stop_token_ids"):
        llm.generate([[5]], SamplingParams(max_tokens=2, stop_token_ids=[10**6]), use_tqdm=False)
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)
    assert not engine.has_unfinished_requests()
    assert engine.stats()["kv_cache_usage"] == 0.0
    ok = llm.generate([[5, 6]], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert len(ok[0].outputs[0].token_ids) == 2


def test_abort_frees_blocks(llm):
    engine = llm.engine
    engine.add_request(
        "x", prompts_of([30], seed=17)[0], SamplingParams(max_tokens=50, ignore_eos=True)
    )
    engine.step()
    assert engine.stats()["kv_cache_usage"] > 0
    engine.abort_request("x")
    assert engine.stats()["kv_cache_usage"] == 0.0
    assert not engine.has_unfinished_requests()
    with pytest.raises(KeyError):
        engine.abort_request("x")


def test_failed_step_aborts_its_requests_and_engine_recovers(llm):
    engine = llm.engine
    # max_tokens=1: the step's placeholder token would finish it in the core, so the engine
    # must abort before closing the step (else abort meets an already-finished request).
    engine.add_request(
        "boom", prompts_of([9], seed=18)[0], SamplingParams(max_tokens=1, ignore_eos=True)
    )
    real_launch = engine.runner.launch

    def failing_launch(*args, **kwargs):
        raise RuntimeError("injected failure")

    engine.runner.launch = failing_launch
    try:
        with pytest.raises(RuntimeError, match="injected"):
            engine.step()
    finally:
        engine.runner.launch = real_launch
    assert not engine.has_unfinished_requests()
    assert engine.stats()["kv_cache_usage"] == 0.0
    ok = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(ok[0].outputs[0].token_ids) == 3
