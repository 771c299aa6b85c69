"""SamplingBatch.build is safe for every value SamplingParams accepts, however large."""

from __future__ import annotations

import pytest
import torch

from kestrel.sample import Sampler, make_generator
from kestrel.sampling_params import SamplingParams as P
from tests.sampling.helpers import build

F32_MAX = torch.finfo(torch.float32).max


@pytest.mark.parametrize("top_k", [40, 41, 2**31 - 1, 2**31, 2**40, 2**100])
def test_top_k_beyond_the_vocabulary_samples_as_disabled(top_k):
    vocab = 40
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(3))

    def sample(k):
        params = [
            P(temperature=1.0, top_k=k, seed=11),
            P(temperature=0.7, top_k=k, top_p=0.8, seed=12),
            P(temperature=0, top_k=k, logprobs=3),  # greedy rows carry their top_k too
        ]
        generators = [make_generator(11, "cpu"), make_generator(12, "cpu"), None]
        batch = build(params, vocab, generators=generators)
        assert batch.top_k.dtype == torch.int32
        out = Sampler()(logits, batch)
        return batch, out

    batch, out = sample(top_k)
    assert batch.top_k.tolist() == [min(top_k, vocab)] * 3
    _, disabled = sample(0)
    assert out.sampled_token_ids.tolist() == disabled.sampled_token_ids.tolist()
    assert torch.equal(out.top_logprob_ids, disabled.top_logprob_ids)


def test_top_k_is_kept_within_the_vocabulary():
    params = [P(temperature=1.0, top_k=k) for k in (-1, 0, 1, 7, 8, 9)]
    assert build(params, 8).top_k.tolist() == [0, 0, 1, 7, 8, 8]


def test_huge_min_and_max_tokens():
    params = [
        P(temperature=0, max_tokens=2**62, min_tokens=2**62, stop_token_ids=[3]),
        P(temperature=1.0, max_tokens=2**100, min_tokens=2**70, ignore_eos=True),
        P(temperature=1.0, max_tokens=None, min_tokens=2**63),
    ]
    batch = build(params, 10, outputs=[[1] * 5] * 3, eos=[(2,)] * 3)
    # Every row is still under min_tokens: row 0 bans EOS and its stop id, row 1 (ignore_eos)
    # its stop ids only (none), row 2 EOS.
    assert batch.banned_rows.tolist() == [0, 0, 2]
    assert batch.banned_ids.tolist() == [2, 3, 2]
    logits = torch.zeros(3, 10)
    logits[:, 2] = 5.0  # EOS would win everywhere if it were not banned
    tokens = Sampler(torch.Generator().manual_seed(0))(logits, batch).sampled_token_ids
    assert tokens[0] != 2 and tokens[2] != 2


def test_huge_temperature_keeps_masked_tokens_masked():
    """A temperature beyond float32 must not turn -inf / inf into NaN (which the argmax would
    pick): the banned EOS id is never sampled and the others come out near uniform."""
    rows = 64
    params = [P(temperature=1e300, min_tokens=5)] * rows
    batch = build(params, 4, eos=[(0,)] * rows)
    assert batch.temperature.tolist() == [F32_MAX] * rows
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0]]).repeat(rows, 1)
    tokens = Sampler(torch.Generator().manual_seed(1))(logits, batch).sampled_token_ids
    assert 0 not in tokens.tolist()
    assert set(tokens.tolist()) == {1, 2, 3}


def test_huge_repetition_penalty_does_not_make_nan():
    """A penalty beyond float32 must not make 0 * inf = NaN at a seen token with logit 0 (the
    argmax would pick the NaN); pushed towards 0 it stays below the unseen 0.5."""
    logits = torch.tensor([[0.0, 0.5, -1.0, 2.0]])
    batch = build([P(temperature=0, repetition_penalty=1e300)], 4, prompts=[[0, 2, 3]])
    assert batch.repetition_penalty.tolist() == [F32_MAX]
    out = Sampler()(logits, batch)
    assert out.sampled_token_ids.tolist() == [1]
