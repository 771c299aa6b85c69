"""The engine runs every step through its executor, on a StepInput of plain arrays."""

from __future__ import annotations

import pickle

import numpy as np

from kestrel import LLM, SamplingParams
from kestrel.executor import StepInput, UniProcExecutor


def test_steps_go_through_the_executor_on_picklable_plain_arrays(tiny_model_dir):
    llm = LLM(tiny_model_dir("qwen2"), block_size=4, num_kv_blocks=128)
    engine = llm.engine
    assert isinstance(engine.executor, UniProcExecutor)
    seen: list[StepInput] = []
    launch = engine.executor.launch

    def recording(step, rows, prompt_rows=None, grammar_mask=None):
        assert isinstance(step, StepInput)
        copy = pickle.loads(pickle.dumps(step.copy()))  # what a worker process would receive
        for name in ("input_ids", "positions", "slot_mapping", "seq_lens", "block_tables"):
            assert np.array_equal(getattr(copy, name), getattr(step, name))
        assert (copy.num_reqs, copy.num_tokens, copy.num_sampled) == (
            step.num_reqs,
            step.num_tokens,
            step.num_sampled,
        )
        seen.append(copy)
        if prompt_rows is not None:  # what a worker process would receive
            prompt_rows = pickle.loads(pickle.dumps(prompt_rows))
        return launch(
            copy, rows, prompt_rows, grammar_mask
        )  # the detached copy runs as well as the views

    engine.executor.launch = recording
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    engine.executor.launch = launch
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == want and len(seen) >= 6
    first = seen[0]
    assert first.num_decodes == 0 and first.num_tokens == 7  # both prompts prefill in step 1
