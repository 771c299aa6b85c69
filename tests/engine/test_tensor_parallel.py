"""Tensor and pipeline parallelism on CPU (gloo, real worker processes): greedy outputs identical
to one process, for tensor-parallel sizes 2 and 4, pipeline sizes 2 and 3 and 2 x 2, with chunked
prefill, prefix caching and preemption; bad sizes and dead workers end with a clear error and
leave no process behind."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest

from kestrel import LLM, EngineConfig, SamplingParams
from kestrel.executor.multiproc import TensorParallelError
from kestrel.testing.tiny_models import make_tiny_model
from tests.engine.helpers import prompts_of

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
LENGTHS = [1, 6, 17, 33, 9]


def _tokens(llm: LLM, prompts, params=GREEDY) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def _no_workers_left() -> bool:
    deadline = time.monotonic() + 10
    while mp.active_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    return not mp.active_children()


@pytest.fixture
def tp_llm():
    made: list[LLM] = []

    def make(path: str, **kwargs) -> LLM:
        llm = LLM(path, block_size=4, **kwargs)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        llm.engine.shutdown()
    assert _no_workers_left()


@pytest.mark.parametrize(
    ("arch", "size"),
    [("llama", 2), ("qwen2", 2), ("qwen3", 2), ("qwen2", 4)],  # qwen3: 1 KV head, replicated
)
def test_greedy_outputs_equal_one_rank(arch, size, tiny_model_dir, tp_llm):
    prompts = prompts_of(LENGTHS, seed=3)
    one = _tokens(tp_llm(tiny_model_dir(arch), num_kv_blocks=128), prompts)
    llm = tp_llm(tiny_model_dir(arch), num_kv_blocks=128, tensor_parallel_size=size)
    assert _tokens(llm, prompts) == one
    assert llm.engine.stats()["num_free_blocks"] == 128
    # Every rank holds its share of the heads.
    assert llm.engine.runner.num_kv_heads == max(
        1, llm.engine.model_config.num_key_value_heads // size
    )


def test_chunked_prefill_prefix_caching_and_preemption(tiny_model_dir, tp_llm):
    shared = prompts_of([20], seed=5)[0]
    prompts = [shared + t for t in prompts_of([3, 11, 7, 15], seed=6)] + prompts_of([30], seed=7)
    kwargs = {"num_kv_blocks": 40, "max_num_batched_tokens": 8, "enable_prefix_caching": True}
    one = _tokens(tp_llm(tiny_model_dir("llama"), **kwargs), prompts)
    llm = tp_llm(tiny_model_dir("llama"), tensor_parallel_size=2, **kwargs)
    assert _tokens(llm, prompts) == one
    stats = llm.engine.stats()
    assert stats["num_preemptions"] > 0  # 40 blocks of 4 cannot hold 5 x (up to 59) tokens
    assert stats["prefix_hit_tokens"] > 0


def test_sampled_outputs_follow_rank_zero(tiny_model_dir, tp_llm):
    """Seeded sampling: rank 0 samples (the workers' samples are dropped), so a seeded request
    gives the one-rank engine's tokens."""
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=16, ignore_eos=True)
    prompts = prompts_of([5, 12], seed=8)
    one = _tokens(tp_llm(tiny_model_dir("qwen2"), num_kv_blocks=64), prompts, params)
    llm = tp_llm(tiny_model_dir("qwen2"), num_kv_blocks=64, tensor_parallel_size=2)
    assert _tokens(llm, prompts, params) == one


def test_sizes_the_model_cannot_split_are_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="not divisible by the tensor-parallel size 3"):
        LLM(tiny_model_dir("llama"), block_size=4, num_kv_blocks=32, tensor_parallel_size=3)
    assert _no_workers_left()
    for bad in (0, -1, 65, True):
        with pytest.raises(ValueError, match="tensor_parallel_size"):
            EngineConfig(tensor_parallel_size=bad)


def test_a_dead_worker_ends_the_engine_with_a_clear_error(tiny_model_dir, tp_llm):
    llm = tp_llm(tiny_model_dir("llama"), num_kv_blocks=64, tensor_parallel_size=2)
    assert _tokens(llm, prompts_of([4], seed=9))  # works first
    worker = llm.engine.executor.world.workers[0]
    os.kill(worker.process.pid, signal.SIGKILL)
    worker.process.join(10)
    t0 = time.monotonic()
    with pytest.raises(TensorParallelError, match=r"rank 1 \(exited with code -9\)"):
        llm.generate(prompts_of([6], seed=10), GREEDY, use_tqdm=False)
    assert time.monotonic() - t0 < 30


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])  # qwen2: tied LM head
def test_pipeline_stages_give_the_outputs_of_one_process(arch, tiny_model_dir, tp_llm):
    prompts = prompts_of(LENGTHS, seed=12)
    one = _tokens(tp_llm(tiny_model_dir(arch), num_kv_blocks=128), prompts)
    llm = tp_llm(tiny_model_dir(arch), num_kv_blocks=128, pipeline_parallel_size=2)
    assert _tokens(llm, prompts) == one
    assert llm.engine.runner.num_layers == 1  # 2 layers over 2 stages
    assert llm.engine.stats()["num_free_blocks"] == 128


def test_three_uneven_stages_with_chunked_prefill_and_preemption(tmp_path, tp_llm):
    path = str(make_tiny_model(tmp_path / "four", "llama", num_layers=4))
    prompts = prompts_of([3, 25, 14, 30, 8], seed=13)
    kwargs = {"num_kv_blocks": 36, "max_num_batched_tokens": 8}
    one = _tokens(tp_llm(path, **kwargs), prompts)
    llm = tp_llm(path, pipeline_parallel_size=3, **kwargs)  # layers 2 + 1 + 1
    assert _tokens(llm, prompts) == one
    assert llm.engine.runner.num_layers == 2
    assert llm.engine.stats()["num_preemptions"] > 0
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=12, ignore_eos=True)
    assert _tokens(llm, prompts[:2], params) == _tokens(tp_llm(path, **kwargs), prompts[:2], params)


def test_pipeline_sizes_are_checked(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"pipeline_parallel_size=3 must be in \[1, 2\]"):
        LLM(tiny_model_dir("llama"), block_size=4, num_kv_blocks=32, pipeline_parallel_size=3)
    assert _no_workers_left()
    with pytest.raises(ValueError, match="pipeline_parallel_size"):
        EngineConfig(pipeline_parallel_size=0)
    # Refused from the model's config before any worker process starts (64 would be slow).
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"pipeline_parallel_size=64 must be in \[1, 2\]"):
        LLM(tiny_model_dir("llama"), block_size=4, num_kv_blocks=32, pipeline_parallel_size=64)
    odd = str(
        make_tiny_model(tmp_path / "odd", "llama", hidden_size=96, num_heads=12, num_kv_heads=4)
    )
    with pytest.raises(ValueError, match="num_key_value_heads=4 cannot be split"):
        LLM(odd, block_size=4, num_kv_blocks=32, tensor_parallel_size=3)
    assert time.monotonic() - t0 < 5 and not mp.active_children()


def test_tensor_parallel_stages(tmp_path, tp_llm):
    """tp 2 x pp 2 (four processes): each stage's two ranks split the heads, and each talks to
    the same tensor-parallel rank of the next stage."""
    path = str(make_tiny_model(tmp_path / "four", "qwen2", num_layers=4))
    prompts = prompts_of([5, 19, 11], seed=14)
    kwargs = {"num_kv_blocks": 64, "max_num_batched_tokens": 16}
    one = _tokens(tp_llm(path, **kwargs), prompts)
    llm = tp_llm(path, tensor_parallel_size=2, pipeline_parallel_size=2, **kwargs)
    assert _tokens(llm, prompts) == one
    assert (llm.engine.runner.num_layers, llm.engine.runner.num_kv_heads) == (2, 1)
