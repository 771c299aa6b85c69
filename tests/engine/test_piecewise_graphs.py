"""Piecewise CUDA graphs' host side (kestrel/runner/piecewise_graphs.py), on the CPU.

The pieces run eagerly here (`use_graphs=False`) over the same static buffers and padded token
counts the graphs replay: greedy outputs equal the plain forward's, the padding rows write
nothing into the KV cache, and the split forward equals `forward`. The graphs themselves are
tested on a GPU (tests/gpu/test_piecewise_gpu.py).
"""

from __future__ import annotations

import pytest
import torch

from kestrel import LLM, EngineConfig, SamplingParams
from kestrel.config import ConfigError
from kestrel.runner.piecewise_graphs import PiecewiseGraphs, piecewise_token_sizes
from tests.engine.helpers import prompts_of


def test_token_sizes():
    assert piecewise_token_sizes(2048) == [
        16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048,
    ]  # fmt: skip
    assert piecewise_token_sizes(100) == [16, 32, 64, 96, 100]
    assert piecewise_token_sizes(8) == [8]
    assert piecewise_token_sizes(16) == [16]
    with pytest.raises(ValueError, match="piecewise_graph_max_tokens"):
        piecewise_token_sizes(0)


@pytest.mark.parametrize("bad", [-1, 1 << 17, True, 2.5])
def test_config_rejects_bad_max_tokens(bad):
    with pytest.raises(ConfigError, match="piecewise_graph_max_tokens"):
        EngineConfig(model="x", piecewise_graph_max_tokens=bad)


class _Spy:
    """Counts PiecewiseGraphs.run calls and the token counts they saw."""

    def __init__(self, monkeypatch):
        self.calls: list[int] = []
        real = PiecewiseGraphs.run

        def run(graphs, input_ids, positions, metadata):
            self.calls.append(int(input_ids.shape[0]))
            return real(graphs, input_ids, positions, metadata)

        monkeypatch.setattr(PiecewiseGraphs, "run", run)


def _engine(model_dir: str, piecewise_tokens: int | None) -> LLM:
    llm = LLM(
        model_dir,
        block_size=4,
        num_kv_blocks=96,
        max_num_seqs=4,  # later prompts join while others decode: mixed steps
        max_num_batched_tokens=40,  # chunked prefill
    )
    if piecewise_tokens is not None:
        llm.engine.runner.capture_piecewise_graphs(piecewise_tokens, use_graphs=False)
    return llm


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_greedy_outputs_equal_the_plain_forward(arch, tiny_model_dir, monkeypatch):
    prompts = prompts_of([3, 37, 9, 61, 20, 5, 44], seed=1)
    params = [
        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (9, 4, 12, 6, 3)
    ] + [SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True)] * 2
    plain = _engine(tiny_model_dir(arch), None).generate(prompts, params, use_tqdm=False)
    spy = _Spy(monkeypatch)
    # 24 < max_num_batched_tokens: the larger steps take the plain forward, the rest the pieces.
    llm = _engine(tiny_model_dir(arch), 24)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in plain]
    assert spy.calls and max(spy.calls) <= 24
    assert any(n not in piecewise_token_sizes(24) for n in spy.calls)  # padded sizes ran
    assert llm.engine.stats()["num_free_blocks"] == 96


def test_padding_rows_write_nothing_and_hidden_matches(tiny_model_dir):
    """One step by hand: the pieces' hidden states and KV cache equal the plain forward's."""
    llm = _engine(tiny_model_dir("qwen3"), 32)
    engine = llm.engine
    runner = engine.runner
    model = runner.model
    # A prefill of 11 tokens through the real scheduler's metadata path: take one step's input.
    captured = {}
    real = runner._forward_eager

    def grab(out, input_ids, prompt_rows):
        captured["out"], captured["ids"] = out, input_ids.clone()
        return real(out, input_ids, prompt_rows)

    runner._forward_eager = grab
    # As if a larger step ran before: stale slots in the padding rows must not be written.
    runner.piecewise.slot_mapping.fill_(96 * 4 - 1)
    engine.add_request("r", prompts_of([11])[0], SamplingParams(max_tokens=1, temperature=0.0))
    engine.step()
    runner._forward_eager = real
    out, ids = captured["out"], captured["ids"]
    assert out.num_tokens == 11
    caches_after_pieces = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    for k, v in runner.kv_caches:  # replay the same step through the plain forward
        k.zero_()
        v.zero_()
    positions = torch.as_tensor(out.positions, dtype=torch.int64)
    metadata = runner.build_attention_metadata(out)
    with torch.inference_mode():
        plain = model(ids, positions, runner.kv_caches, metadata)
        pieces = runner.piecewise.run(ids, positions, metadata)
    assert pieces.shape == plain.shape == (11, engine.model_config.hidden_size)
    torch.testing.assert_close(pieces, plain, rtol=1e-5, atol=1e-5)
    for (k0, v0), (k1, v1) in zip(caches_after_pieces, runner.kv_caches, strict=True):
        torch.testing.assert_close(k0, k1, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v0, v1, rtol=1e-5, atol=1e-6)
    # Exactly the request's 11 slots hold K/V: the 5 padding rows of the 16-token size did not
    # write (slot -1), so every other slot of the cache is still zero.
    written = (caches_after_pieces[0][0].flatten(0, 1).abs().sum(dim=(1, 2)) != 0).sum()
    assert int(written) == 11
