"""Prompt logprobs (SamplingParams.prompt_logprobs) against a full-prompt log_softmax of
transformers' model on the CPU: whole prefills, chunked prefills, n > 1, prefix caching and
preemption."""

import functools

import pytest
import torch

from kestrel import LLM, SamplingParams
from tests.engine.helpers import prompts_of

ARCH = "qwen2"


@pytest.fixture(scope="module")
def reference(hf_greedy):
    """reference(prompt) -> [P - 1, vocab] float32: log_softmax of the logits at positions
    0..P-2 (row i predicts token i + 1)."""
    model = hf_greedy.model(ARCH)

    @functools.cache
    def logprobs(prompt: tuple[int, ...]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([list(prompt)])).logits[0, :-1].float()
        return torch.log_softmax(logits, dim=-1)

    return lambda prompt: logprobs(tuple(prompt))


def check(prompt, entries, k, reference, atol=2e-4):
    ref = reference(prompt)
    assert len(entries) == len(prompt)
    assert entries[0] is None
    for i, entry in enumerate(entries[1:]):
        token = prompt[i + 1]
        row = ref[i]
        assert set(entry) >= {token}
        assert abs(entry[token].logprob - row[token].item()) < atol, (i, token)
        assert entry[token].rank == int((row > row[token]).sum()) + 1
        top = torch.topk(row, k)
        got = sorted(((e.rank, t, e.logprob) for t, e in entry.items() if e.rank <= k))[:k]
        if k:
            assert [t for _, t, _ in got] == top.indices.tolist(), i
            assert [r for r, _, _ in got] == list(range(1, k + 1))
            torch.testing.assert_close(
                torch.tensor([v for _, _, v in got]), top.values, atol=atol, rtol=0
            )
        assert len(entry) in (k, k + 1)


@pytest.fixture(scope="module")
def chunked(tiny_model_dir):
    # Small budget: every prompt below is prefilled in several chunks, mixed with decodes.
    return LLM(tiny_model_dir(ARCH), block_size=4, num_kv_blocks=256, max_num_batched_tokens=8)


@pytest.fixture(scope="module")
def whole(tiny_model_dir):
    return LLM(tiny_model_dir(ARCH), block_size=4, num_kv_blocks=256)


@pytest.mark.parametrize("engine", ["whole", "chunked"])
def test_prompt_logprobs_match_full_prompt_log_softmax(engine, request, reference):
    llm = request.getfixturevalue(engine)
    prompts = prompts_of([23, 5, 2, 17, 1], seed=31)
    ks = [0, 3, 20, 5, 2]
    params = [
        SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=k, ignore_eos=True) for k in ks
    ]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, k, out in zip(prompts, ks, outputs):
        check(prompt, out.prompt_logprobs, k, reference)
        assert len(out.outputs[0].token_ids) == 3


def test_no_prompt_logprobs_unless_asked(whole):
    out = whole.generate(prompts_of([6], seed=3), SamplingParams(max_tokens=2), use_tqdm=False)
    assert out[0].prompt_logprobs is None


def test_prompt_logprobs_with_n_and_sampling(chunked, reference):
    prompt = prompts_of([19], seed=32)[0]
    params = SamplingParams(
        n=3, temperature=1.0, seed=7, max_tokens=4, prompt_logprobs=4, logprobs=2, ignore_eos=True
    )
    (out,) = chunked.generate([prompt], params, use_tqdm=False)
    check(prompt, out.prompt_logprobs, 4, reference)
    assert len(out.outputs) == 3 and all(len(c.token_ids) == 4 for c in out.outputs)


def test_prompt_logprobs_ignore_the_prefix_cache(whole, reference):
    # The first request caches the prompt's blocks; the second asks prompt logprobs of the
    # same prompt (longer, sharing the prefix) and must still get every position.
    prompt = prompts_of([26], seed=33)[0]
    whole.generate([prompt[:20]], SamplingParams(max_tokens=1), use_tqdm=False)
    plain = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    asked = plain.clone(prompt_logprobs=1)
    out = whole.generate([prompt, prompt], [asked, plain], use_tqdm=False)
    check(prompt, out[0].prompt_logprobs, 1, reference)
    assert out[0].outputs[0].token_ids == out[1].outputs[0].token_ids
    again = whole.generate([prompt], asked, use_tqdm=False)
    assert again[0].prompt_logprobs == out[0].prompt_logprobs


def test_prompt_logprobs_survive_preemption(tiny_model_dir, reference):
    # 12 blocks of 4 tokens: the three requests cannot all run to the end, so some are
    # preempted (some in the middle of their prefill) and recomputed.
    llm = LLM(tiny_model_dir(ARCH), block_size=4, num_kv_blocks=12, max_num_batched_tokens=8)
    prompts = prompts_of([14, 18, 11], seed=34)
    params = SamplingParams(temperature=0, max_tokens=20, prompt_logprobs=2, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.stats()["num_preemptions"] > 0
    for prompt, out in zip(prompts, outputs):
        check(prompt, out.prompt_logprobs, 2, reference)
