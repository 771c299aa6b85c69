"""Piecewise CUDA graphs on a GPU: steps with prefill rows replayed from graphs give the same
tokens as the same pieces run eagerly (bit for bit: the same kernels at the same padded sizes),
and agree with the plain eager forward."""

from __future__ import annotations

import pytest
import torch

from kestrel import LLM, SamplingParams
from kestrel.runner.piecewise_graphs import PiecewiseGraphs
from kestrel.testing.tiny_models import make_tiny_model

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def tiny_dir(request, tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp(f"pw-{request.param}"), request.param))


def _prompts(lengths, seed=0, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _run(llm: LLM, prompts, lens):
    params = [
        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=2) for n in lens
    ]
    return llm.generate(prompts, params, use_tqdm=False)


def test_graph_replay_equals_eager_pieces(tiny_dir, monkeypatch):
    llm = LLM(
        tiny_dir,
        dtype="bfloat16",
        block_size=16,
        num_kv_blocks=256,
        max_num_seqs=4,  # later prompts join running decodes: mixed steps
        max_num_batched_tokens=96,  # long prompts are chunked
        piecewise_graph_max_tokens=64,  # larger steps take the plain forward
    )
    runner = llm.engine.runner
    assert runner.piecewise is not None and runner.piecewise.graphs
    calls: list[int] = []
    real = PiecewiseGraphs.run

    def spy(graphs, input_ids, positions, metadata):
        calls.append(int(input_ids.shape[0]))
        return real(graphs, input_ids, positions, metadata)

    monkeypatch.setattr(PiecewiseGraphs, "run", spy)
    prompts = _prompts([5, 150, 33, 9, 70, 41, 2, 17])
    lens = [12, 5, 9, 20, 7, 3, 15, 8]
    graphs = _run(llm, prompts, lens)
    assert calls and max(calls) <= 64 and len(set(calls)) > 2
    runner.piecewise.use_graphs = False  # the same pieces and buffers, eagerly
    eager_pieces = _run(llm, prompts, lens)
    for a, b in zip(graphs, eager_pieces, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert la.keys() == lb.keys()
            for tok in la:
                assert la[tok].logprob == lb[tok].logprob  # bit-identical
    runner.piecewise = None  # the plain eager forward (unpadded GEMMs: bf16 may round apart)
    plain = _run(llm, prompts, lens)
    same = sum(
        a.outputs[0].token_ids[:3] == b.outputs[0].token_ids[:3]
        for a, b in zip(graphs, plain, strict=True)
    )
    assert same >= len(prompts) - 1
    assert llm.engine.stats()["kv_cache_usage"] == 0.0


def test_off_switch(tiny_dir):
    llm = LLM(tiny_dir, dtype="bfloat16", num_kv_blocks=64, piecewise_graph_max_tokens=0)
    assert llm.engine.runner.piecewise is None
    eager = LLM(tiny_dir, dtype="bfloat16", num_kv_blocks=64, enforce_eager=True)
    assert eager.engine.runner.piecewise is None
