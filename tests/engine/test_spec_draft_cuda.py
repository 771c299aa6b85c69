"""Draft-model speculation on a CUDA GPU (skipped without one).

fp32 (the attention reference, eager): the target as its own draft gives the plain engine's
tokens and accepts (nearly) every draft, also with small blocks, chunked prefill and a lagging
draft cache that catches up. bf16 with CUDA graphs: the draft's chain steps replay its own
decode graphs (counted) while the verify rows run the prefill path, whose sums are ordered
differently from the decode kernel's, so near-ties may flip: outputs must agree with the plain
engine on their first 8 tokens and most in full, and most drafts must be accepted. Memory
planning gives the engine with a draft fewer blocks."""

from __future__ import annotations

import pytest
import torch

from kestrel import LLM, SamplingParams
from kestrel.testing.tiny_models import make_tiny_model

pytestmark = pytest.mark.cuda

K = 4
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("gpu-draft-tiny"), "qwen3"))


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("gpu-draft-other"), "qwen3", seed=9))


def _prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 500, (n,), generator=g).tolist() for n in (5, 17, 33, 48, 9, 26)]


def _spec(model: str, **kw) -> dict:
    return {"method": "draft_model", "model": model, "num_speculative_tokens": K, **kw}


def _run(model_dir, spec, params=GREEDY, **kw):
    kw.setdefault("num_kv_blocks", 256)
    llm = LLM(model_dir, max_num_seqs=8, speculative_config=spec, **kw)
    assert llm.engine.device.type == "cuda"
    outs = [o.outputs[0].token_ids for o in llm.generate(_prompts(), params, use_tqdm=False)]
    return outs, llm


def _acceptance(llm) -> tuple[int, int, int]:
    s = llm.engine.stats()
    keys = ("spec_decode_num_drafts", "spec_decode_num_draft_tokens")
    return (*(s[k] for k in keys), s["spec_decode_num_accepted_tokens"])


STAGGERED = [
    SamplingParams(temperature=0.0, max_tokens=8 * (i + 1), ignore_eos=True) for i in range(6)
]


@pytest.mark.parametrize(
    "extra, spec_extra, params",
    [
        ({}, {}, GREEDY),
        ({"max_num_batched_tokens": 16, "block_size": 4}, {}, GREEDY),
        # No drafts while more than 2 run: the last ones catch their draft cache up.
        ({}, {"disable_by_batch_size": 2}, STAGGERED),
    ],
    ids=["default", "small-blocks-chunked", "lagging-cache"],
)
def test_fp32_the_target_as_its_own_draft(tiny_dir, extra, spec_extra, params):
    plain, _ = _run(tiny_dir, None, params, dtype="float32", **extra)
    spec, llm = _run(tiny_dir, _spec(tiny_dir, **spec_extra), params, dtype="float32", **extra)
    assert spec == plain
    drafts, draft_tokens, accepted = _acceptance(llm)
    assert drafts > 0 and accepted >= 0.97 * draft_tokens


def test_bf16_with_graphs_the_target_as_its_own_draft(tiny_dir):
    plain, _ = _run(tiny_dir, None, dtype="bfloat16")
    llm = LLM(tiny_dir, num_kv_blocks=256, max_num_seqs=8, dtype="bfloat16",
              speculative_config=_spec(tiny_dir))  # fmt: skip
    graphs = llm.engine._drafter.runner.graphs
    assert graphs is not None, "the draft's decode graphs were not captured"
    replays = []
    run = graphs.run
    graphs.run = lambda *a, **kw: (replays.append(1), run(*a, **kw))[1]
    spec = [o.outputs[0].token_ids for o in llm.generate(_prompts(), GREEDY, use_tqdm=False)]
    assert len(replays) >= 10  # chain steps replayed, not run eagerly
    assert all(s[:8] == p[:8] for s, p in zip(spec, plain))
    assert sum(s == p for s, p in zip(spec, plain)) >= len(plain) - 1
    drafts, draft_tokens, accepted = _acceptance(llm)
    assert drafts > 0 and accepted >= 0.8 * draft_tokens


def test_bf16_a_draft_with_other_weights(tiny_dir, other_dir):
    plain, _ = _run(tiny_dir, None, dtype="bfloat16")
    spec, llm = _run(tiny_dir, _spec(other_dir, min_acceptance_rate=0), dtype="bfloat16")
    assert all(s[:8] == p[:8] for s, p in zip(spec, plain))
    assert sum(s == p for s, p in zip(spec, plain)) >= len(plain) - 1
    drafts, draft_tokens, accepted = _acceptance(llm)
    assert drafts > 0 and accepted < 0.5 * draft_tokens


def test_bf16_seeded_sampling_with_a_draft_is_reproducible(tiny_dir):
    params = SamplingParams(temperature=0.7, seed=3, max_tokens=32, ignore_eos=True)
    a, llm = _run(tiny_dir, _spec(tiny_dir), params=params, dtype="bfloat16")
    b = [o.outputs[0].token_ids for o in llm.generate(_prompts(), params, use_tqdm=False)]
    assert a == b
    assert _acceptance(llm)[2] > 0


def test_memory_planning_counts_the_draft_cache(tiny_dir):
    """The CUDA budget (card memory less weights, activation peak) over both models' bytes
    per block: the target as its own draft halves the blocks. A config with room for many
    sequences, so that the budget and not max_num_seqs bounds the blocks."""
    from kestrel.config import EngineConfig
    from kestrel.runner.memory import plan_num_kv_blocks

    llm = LLM(tiny_dir, dtype="bfloat16", max_num_seqs=8, num_kv_blocks=64, enforce_eager=True,
              speculative_config=_spec(tiny_dir))  # fmt: skip
    drafter, runner = llm.engine._drafter, llm.engine.runner
    cfg = EngineConfig(
        model=tiny_dir, gpu_memory_utilization=0.3, max_num_seqs=1 << 24,
        max_num_batched_tokens=2048, enforce_eager=True,
    )  # fmt: skip
    alone = plan_num_kv_blocks(cfg, runner, 512)
    both = plan_num_kv_blocks(cfg, runner, 512, drafter.block_bytes(), drafter.scratch_bytes())
    assert drafter.block_bytes() * 64 * 2 <= 1 << 30  # tiny: the budget holds millions
    # Each call measures free memory anew (the first call's profiling may free some): the
    # budgets differ by a little, so the bound is not exactly half.
    assert alone > 1_000_000 and 0.45 * alone < both <= 0.51 * alone
