"""Greedy generations are token-for-token those of transformers, whatever the batching path."""

import pytest

from kestrel import LLM, SamplingParams
from tests.engine.helpers import prompts_of

GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
LENGTHS = [1, 5, 17, 33, 50]


@pytest.fixture(scope="module")
def reference(hf_greedy):
    cache = {}

    def ref(arch, prompts):
        return [cache.setdefault((arch, tuple(p)), hf_greedy(arch, p, 32)) for p in prompts]

    return ref


def _tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_batch_of_mixed_prompts_matches_transformers(arch, tiny_model_dir, reference):
    prompts = prompts_of(LENGTHS, seed=1)
    llm = LLM(tiny_model_dir(arch), block_size=4, num_kv_blocks=256)
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert _tokens(outputs) == reference(arch, prompts)
    assert all(o.outputs[0].finish_reason == "length" for o in outputs)
    assert llm.engine.stats()["num_free_blocks"] == 256


def test_chunked_prefill_with_tiny_budget(tiny_model_dir, reference):
    prompts = prompts_of(LENGTHS, seed=2)
    llm = LLM(
        tiny_model_dir("qwen2"),
        block_size=4,
        num_kv_blocks=256,
        max_num_batched_tokens=7,
        enable_prefix_caching=False,
    )
    assert _tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == reference("qwen2", prompts)


def test_prefix_caching_with_shared_prefixes(tiny_model_dir, reference):
    shared = prompts_of([24], seed=3)[0]
    tails = prompts_of([1, 3, 9, 14], seed=4)
    prompts = [shared + t for t in tails]
    llm = LLM(tiny_model_dir("llama"), block_size=4, num_kv_blocks=256)
    first = llm.generate(prompts[:1], GREEDY, use_tqdm=False)  # fills the cache
    rest = llm.generate(prompts[1:], GREEDY, use_tqdm=False)
    assert _tokens(first + rest) == reference("llama", prompts)
    stats = llm.engine.stats()
    assert stats["prefix_hit_tokens"] >= 3 * 24
    assert first[0].metrics.num_cached_prompt_tokens == 0
    # Each later prompt reuses the 6 shared blocks (24 tokens); its tail blocks differ.
    assert [r.metrics.num_cached_prompt_tokens for r in rest] == [24, 24, 24]


def test_forced_preemption(tiny_model_dir, reference):
    prompts = prompts_of([20, 21, 22, 23], seed=5)
    # 24 blocks of 4 = 96 tokens of KV for 4 requests that grow to ~53 tokens each.
    llm = LLM(tiny_model_dir("qwen3"), block_size=4, num_kv_blocks=24, enable_prefix_caching=False)
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.engine.stats()["num_preemptions"] >= 1
    assert _tokens(outputs) == reference("qwen3", prompts)


def test_requests_arriving_mid_run(tiny_model_dir, reference):
    prompts = prompts_of([6, 30, 11, 2], seed=6)
    llm = LLM(tiny_model_dir("mistral"), block_size=16, num_kv_blocks=64)
    engine = llm.engine
    done = {}
    engine.add_request("a", prompts[0], GREEDY)
    engine.add_request("b", prompts[1], GREEDY)
    step = 0
    while engine.has_unfinished_requests() or step < 10:
        if step == 3:
            engine.add_request("c", prompts[2], GREEDY)
        if step == 9:
            engine.add_request("d", prompts[3], GREEDY)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        step += 1
    expected = reference("mistral", prompts)
    assert [done[k] for k in "abcd"] == expected


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_matches_transformers_generate_with_eos(arch, tiny_model_dir, hf_greedy):
    """With EOS honoured on both sides, outputs equal transformers' own `generate`."""
    import torch

    prompts = prompts_of(LENGTHS, seed=1)
    model = hf_greedy.model(arch)
    llm = LLM(tiny_model_dir(arch), block_size=4, num_kv_blocks=256)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=32), use_tqdm=False)
    reasons = set()
    for prompt, out in zip(prompts, outputs):
        with torch.no_grad():
            ref = model.generate(
                torch.tensor([prompt]),
                max_new_tokens=32,
                do_sample=False,
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                pad_token_id=0,
            )[0, len(prompt) :].tolist()
        assert out.outputs[0].token_ids == ref
        reasons.add(out.outputs[0].finish_reason)
    if arch == "qwen3":  # this fixture has prompts that end at EOS and ones that run to 32
        assert reasons == {"stop", "length"}


def test_dummy_weights_generate(tiny_model_dir):
    llm = LLM(tiny_model_dir("qwen3"), load_format="dummy", block_size=16, num_kv_blocks=32)
    out = llm.generate(
        prompts_of([10, 3]), SamplingParams(max_tokens=5, ignore_eos=True), use_tqdm=False
    )
    assert [len(o.outputs[0].token_ids) for o in out] == [5, 5]
