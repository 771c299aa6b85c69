"""Speculative verify CUDA graphs on a GPU (runner/verify_graphs.py): uniform verify steps
replayed from a (batch, query length) graph give the tokens of the same steps run eagerly (at
batch 1 the graph's shapes are the eager pass's; cuBLAS under capture may still round apart)."""

from __future__ import annotations

import pytest

from kestrel import LLM, SamplingParams
from kestrel.runner.verify_graphs import VerifyGraphs
from kestrel.testing.tiny_models import make_tiny_model

pytestmark = pytest.mark.cuda

# min_acceptance_rate 0: every step drafts, so the drafts (and so the graphs replayed) are a
# function of the tokens alone, and two runs with the same seeds replay the same graphs.
SPEC = {
    "method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
    "min_acceptance_rate": 0,
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    # head_dim 64: the attention kernels (verify graphs are captured over kernels only).
    path = tmp_path_factory.mktemp("verify-graphs")
    return str(make_tiny_model(path, "qwen3", hidden_size=256, num_heads=4, head_dim=64))


def _prompts():
    spans = [[11, 12, 13, 14], [200, 201, 5], [77, 78, 79, 80, 81]]
    return [(spans[i % 3] + spans[(i + 1) % 3]) * (3 + i) for i in range(4)]


def test_no_verify_graphs_over_the_attention_reference(tmp_path):
    """head_dim 16 has no kernel: the prefill reference would bake host lengths into a graph."""
    small = str(make_tiny_model(tmp_path, "qwen3"))
    llm = LLM(small, dtype="bfloat16", num_kv_blocks=64, max_num_seqs=1, speculative_config=SPEC)
    assert llm.engine.runner.verify_graphs is None


def _generate(llm, params):
    return [
        (o.outputs[0].token_ids, o.outputs[0].logprobs)
        for o in llm.generate(_prompts(), params, use_tqdm=False)
    ]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_verify_graphs_agree_with_eager_at_batch_1(tiny_dir, monkeypatch, temperature):
    llm = LLM(
        tiny_dir,
        dtype="bfloat16",
        num_kv_blocks=256,
        max_num_seqs=1,
        speculative_config=SPEC,
        piecewise_graph_max_tokens=0,  # a verify step that is not uniform runs eagerly
    )
    runner = llm.engine.runner
    assert runner.verify_graphs is not None
    assert sorted(runner.verify_graphs.graphs) == [(1, 2), (1, 3), (1, 4)]
    replays = []
    real = VerifyGraphs.run

    def spy(graphs, out, input_ids, stage):
        replays.append(out.max_query_len)
        return real(graphs, out, input_ids, stage)

    monkeypatch.setattr(VerifyGraphs, "run", spy)
    params = SamplingParams(
        temperature=temperature, seed=7, max_tokens=48, ignore_eos=True, logprobs=1
    )
    graphs = _generate(llm, params)
    assert replays and max(replays) == 4
    stats = llm.engine.stats()
    assert stats["spec_decode_num_accepted_tokens"] > 0
    again = _generate(llm, params)  # the same graphs, the same seeds: the same tokens
    assert [t for t, _ in again] == [t for t, _ in graphs]
    runner.verify_graphs = None
    eager = _generate(llm, params)
    # Not bit-identical: cuBLAS may pick other GEMM kernels under capture (another stream's
    # workspace), so bf16 rounds apart at times and a near-tie (or, sampled, a draw near a
    # boundary) can go the other way later in a sequence.
    assert all(a[:8] == b[:8] for (a, _), (b, _) in zip(graphs, eager, strict=True))
    assert llm.engine.stats()["kv_cache_usage"] == 0.0


def test_verify_graphs_padded_batch(tiny_dir):
    """max_num_seqs 3: sizes 1, 2, 3 (two requests pad the 3 graph at times); tokens agree with eager on
    their first 8 tokens (bf16 GEMMs of another row count may round a near-tie apart later)."""
    llm = LLM(
        tiny_dir, dtype="bfloat16", num_kv_blocks=256, max_num_seqs=3, speculative_config=SPEC
    )
    runner = llm.engine.runner
    assert runner.verify_graphs is not None and runner.verify_graphs.batch_sizes == [
        1,
        2,
        3,
    ]  # 3 = max_num_seqs
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    graphs = _generate(llm, params)
    runner.verify_graphs = None
    runner.piecewise = None
    eager = _generate(llm, params)
    assert all(a[:8] == b[:8] for (a, _), (b, _) in zip(graphs, eager, strict=True))
    assert llm.engine.stats()["kv_cache_usage"] == 0.0
