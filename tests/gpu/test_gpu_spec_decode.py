"""n-gram speculation on a CUDA GPU (skipped without one): verify steps (k + 1 query rows per
request) run eagerly through the paged attention backend while plain decodes replay graphs.

fp32: outputs must equal the engine without speculation token for token. bf16 with CUDA graphs:
the verify rows go through the prefill path and plain decodes through the decode kernel, whose
sums are ordered differently, so a near-tie may flip late in a sequence; each output must agree
with the plain one on its first 8 tokens, most outputs in full, and drafts must be accepted."""

from __future__ import annotations

import pytest

from kestrel import LLM, SamplingParams
from kestrel.testing.tiny_models import make_tiny_model

pytestmark = pytest.mark.cuda

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("gpu-spec-tiny"), "qwen3"))


def _prompts():
    spans = [[11, 12, 13, 14], [200, 201, 5], [77, 78, 79, 80, 81]]
    return [(spans[i % 3] + spans[(i + 1) % 3]) * (2 + i) for i in range(6)]


def _run(tiny_dir, spec, **kw):
    llm = LLM(tiny_dir, num_kv_blocks=256, max_num_seqs=8, speculative_config=spec, **kw)
    assert llm.engine.device.type == "cuda"
    outs = [o.outputs[0].token_ids for o in llm.generate(_prompts(), GREEDY, use_tqdm=False)]
    return outs, llm.engine.stats()


@pytest.mark.parametrize("extra", [{}, {"max_num_batched_tokens": 16, "block_size": 4}])
def test_fp32_speculation_gives_the_plain_greedy_tokens(tiny_dir, extra):
    plain, _ = _run(tiny_dir, None, dtype="float32", **extra)
    spec, stats = _run(tiny_dir, SPEC, dtype="float32", **extra)
    assert spec == plain
    assert stats["spec_decode_num_accepted_tokens"] > 0


def test_bf16_speculation_with_graphs_agrees_with_plain(tiny_dir):
    plain, _ = _run(tiny_dir, None, dtype="bfloat16")
    spec, stats = _run(tiny_dir, SPEC, dtype="bfloat16")
    assert all(s[:8] == p[:8] for s, p in zip(spec, plain))
    assert sum(s == p for s, p in zip(spec, plain)) >= len(plain) - 1
    assert stats["spec_decode_num_accepted_tokens"] > 0
