"""FP8 KV caches on the GPU: a captured CUDA graph of the KV write + attention replays the
eager result bit for bit, the engine's decode graphs run with an FP8 cache and give the eager
engine's tokens. (The doubling of the blocks is tested on the CPU, tests/engine/
test_fp8_kv_engine.py: the GPU budget differs only in where the bytes come from.)"""

from __future__ import annotations

import pytest
import torch

from kestrel import LLM, SamplingParams
from kestrel.ops import (
    _dispatch,
    compute_cos_sin_cache,
    paged_attention,
    rotary_embedding_and_cache,
)
from kestrel.ops.attention_backend import PagedAttentionBackend
from kestrel.ops.kv_quant import FP8_KV_DTYPE, quantize_kv
from kestrel.testing.tiny_models import make_tiny_model
from tests.kernels.helpers import make_paged_batch, set_kernel_env

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def _run_unverified(monkeypatch):
    """Kept from before the kernels were verified (harmless now that they are on)."""
    set_kernel_env(monkeypatch, _dispatch.UNVERIFIED_ENV, "1")


HQ, HKV, D = 28, 4, 128


def test_graph_replays_the_fp8_write_and_attention():
    gen = torch.Generator(device="cuda").manual_seed(5)
    batch = make_paged_batch([(1, 900)] * 8, 8, HQ, HKV, D, torch.bfloat16, gen)
    key_cache = quantize_kv(batch.key_cache.float(), 0.02)
    value_cache = quantize_kv(batch.value_cache.float(), 0.01)
    backend = PagedAttentionBackend(
        num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, block_size=16, dtype=torch.bfloat16,
        device=torch.device("cuda", torch.cuda.current_device()), kv_cache_dtype=FP8_KV_DTYPE,
    )  # fmt: skip
    planned = backend.plan(batch.metadata)
    assert planned.plan.use_kernels and planned.plan.decode_splits > 1
    cos_sin = compute_cos_sin_cache(D, 1024, 10000.0, None, device="cuda")
    positions = batch.metadata.seq_lens.long() - 1
    k_new = torch.randn(8, HKV, D, device="cuda", generator=gen).to(torch.bfloat16)
    v_new = torch.randn(8, HKV, D, device="cuda", generator=gen).to(torch.bfloat16)

    def step(kc, vc):
        q, k = batch.q.clone(), k_new.clone()
        rotary_embedding_and_cache(
            positions, q, k, v_new, cos_sin, kc, vc, planned.slot_mapping, 0.02, 0.01
        )
        return paged_attention(q, kc, vc, planned, D**-0.5, 0.02, 0.01)

    eager_kc, eager_vc = key_cache.clone(), value_cache.clone()
    eager = step(eager_kc, eager_vc)
    graph_kc, graph_vc = key_cache.clone(), value_cache.clone()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        captured = step(graph_kc, graph_vc)
    torch.cuda.current_stream().wait_stream(stream)
    graph_kc.copy_(key_cache)  # undo the capture's own writes: the replay writes them again
    graph_vc.copy_(value_cache)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    assert torch.equal(graph_kc.view(torch.uint8), eager_kc.view(torch.uint8))
    assert torch.equal(graph_vc.view(torch.uint8), eager_vc.view(torch.uint8))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    # head_dim 64: one the kernels take (graphs need every op on a kernel)
    return str(make_tiny_model(tmp_path_factory.mktemp("gpu-tiny-fp8kv"), "qwen3", head_dim=64))


def test_decode_graphs_with_an_fp8_cache_equal_eager(tiny_dir):
    """Four prompts, max_num_seqs 4: every decode step fills the batch-4 graph, so its GEMMs
    have the eager shapes; contexts stay under one 64-token split, so the graph's split plan
    (for max_model_len) computes what the eager one does."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (3, 17, 30, 9)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outs = {}
    for eager in (True, False):
        llm = LLM(
            tiny_dir, dtype="bfloat16", kv_cache_dtype="fp8", num_kv_blocks=64, max_num_seqs=4,
            max_model_len=128, enforce_eager=eager,
        )  # fmt: skip
        runner = llm.engine.runner
        assert runner.kv_caches[0][0].dtype == FP8_KV_DTYPE
        replays = 0
        if not eager:
            assert runner.graphs is not None
            run = runner.graphs.run

            def counted(*args, _run=run, **kwargs):
                nonlocal replays
                replays += 1
                return _run(*args, **kwargs)

            runner.graphs.run = counted
        generated = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        outs[eager] = [o.outputs[0].token_ids for o in generated]
        if not eager:
            assert replays >= 20, replays
        del llm
        torch.cuda.empty_cache()
    assert outs[False] == outs[True]


def test_by_default_an_fp8_cache_runs_the_kernels_with_graphs(tiny_dir, monkeypatch):
    """Verified on the H200: no opt-in needed (KESTREL_UNVERIFIED_KERNELS unset)."""
    set_kernel_env(monkeypatch, _dispatch.UNVERIFIED_ENV, None)
    llm = LLM(tiny_dir, dtype="bfloat16", kv_cache_dtype="fp8", num_kv_blocks=64, max_num_seqs=4)
    assert llm.engine.runner.graphs is not None
    assert llm.engine.runner.attention.kernels
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], params, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 8
