"""The engine keeps the runner's persistent input batch in step with its sequences: a slot per
sequence being sampled, freed on every way out (finish, abort, failure, preemption), and the
sampling state carried across a preemption."""

from __future__ import annotations

from kestrel import LLM, SamplingParams
from tests.engine.helpers import prompts_of

EDITED = SamplingParams(
    temperature=0.9,
    seed=11,
    top_k=40,
    repetition_penalty=1.3,
    presence_penalty=0.5,
    frequency_penalty=0.3,
    min_tokens=6,
    logit_bias={17: 3.0},
    max_tokens=30,
)


def _slots_in_use(llm) -> int:
    return len(llm.engine.runner.input_batch)


def test_sampling_state_survives_preemption(tiny_model_dir):
    """Seeded, penalized rows give the same tokens when preemption takes their slots away
    (they come back with their output so far) as in a cache large enough for all of them."""
    prompts = prompts_of([20, 21, 22, 23], seed=5)
    params = [EDITED.clone(seed=11 + i) for i in range(len(prompts))]
    roomy = LLM(tiny_model_dir("qwen3"), block_size=4, num_kv_blocks=256)
    want = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    tight = LLM(
        tiny_model_dir("qwen3"), block_size=4, num_kv_blocks=24, enable_prefix_caching=False
    )
    got = [o.outputs[0].token_ids for o in tight.generate(prompts, params, use_tqdm=False)]
    assert tight.engine.stats()["num_preemptions"] >= 1
    assert got == want
    assert _slots_in_use(tight) == 0 and _slots_in_use(roomy) == 0


def test_more_requests_than_slots(tiny_model_dir):
    """Waiting requests hold no slot: 7 prompts (n=2 on some) run through 2 slots."""
    llm = LLM(tiny_model_dir("qwen2"), block_size=4, num_kv_blocks=128, max_num_seqs=2)
    prompts = prompts_of([5, 9, 3, 12, 7, 4, 6], seed=3)
    params = [EDITED.clone(n=1 + i % 2, seed=i) for i in range(len(prompts))]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs) for o in outs] == [1 + i % 2 for i in range(len(prompts))]
    assert all(len(c.token_ids) == 30 or c.finish_reason == "stop" for o in outs for c in o.outputs)
    assert _slots_in_use(llm) == 0
    assert llm.engine.runner.input_batch.num_free_slots == 2


def test_abort_frees_the_slots(tiny_model_dir):
    llm = LLM(tiny_model_dir("qwen2"), block_size=4, num_kv_blocks=128, max_num_seqs=4)
    engine = llm.engine
    prompts = prompts_of([5, 6, 7], seed=9)
    long = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    engine.add_request("a", prompts[0], long)
    engine.add_request("b", prompts[1], EDITED.clone(n=2, max_tokens=50, ignore_eos=True))
    engine.add_request("c", prompts[2], long)
    assert _slots_in_use(llm) == 0  # slots are taken when a sequence is first sampled
    for _ in range(3):
        engine.step()
    assert _slots_in_use(llm) == 4
    engine.abort_request("b")
    assert _slots_in_use(llm) == 2
    engine.abort_request("a")
    engine.abort_request("c")
    assert _slots_in_use(llm) == 0 and not engine.has_unfinished_requests()
