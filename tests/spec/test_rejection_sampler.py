"""Speculative sampling follows the target distribution exactly.

Chi-square goodness of fit (fixed seeds, so the test is deterministic; the threshold 1e-3 is
far from both the correct sampler's p-values and the wrong samplers', which are below 1e-6) of
the first three output tokens against the exact distribution plain sampling defines, with every
processing step on (penalties that must count the drafts before a row, min_tokens, logit bias,
temperature, top-k / top-p); deliberately wrong samplers fail it. The residual path of a real
(non-one-hot) draft distribution q matches p too."""

from __future__ import annotations

import pytest
import torch

from kestrel.spec.rejection import NO_DRAFT, draw_noise, rejection_sample
from tests.spec import sim

NUM_TRIALS = 3000
NUM_TOKENS = 3
THRESHOLD = 1e-3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Thousands of [4, 8] ops: thread wake-ups would dominate (11 ms a softmax on 2 threads
    on the CI machine against 5 us on one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def expected(one_thread):
    return sim.exact_distribution(NUM_TOKENS)


def sample_many(**kw) -> list[tuple]:
    return [tuple(sim.decode(seed, NUM_TOKENS, **kw)) for seed in range(NUM_TRIALS)]


def test_plain_sampling_matches_the_exact_distribution(expected):
    """The oracle itself: plain decoding through the same loop fits."""
    assert sim.chi_square_p_value(sample_many(proposer=None), expected) > THRESHOLD


@pytest.mark.parametrize("rewind", [True, False])
def test_speculative_sampling_matches_the_exact_distribution(expected, rewind):
    """With the rewind the tokens equal plain sampling's seed by seed (see below); without it
    the noise is used differently, and the distribution must still be exact."""
    samples = sample_many(proposer=sim.random_drafts(3), rewind=rewind)
    assert sim.chi_square_p_value(samples, expected) > THRESHOLD


def test_drafts_ignored_by_the_penalties_fail(expected):
    """A verify row whose penalties do not count the drafts before it samples the wrong p."""
    samples = sample_many(proposer=sim.random_drafts(3), draft_aware=False)
    assert sim.chi_square_p_value(samples, expected) < 1e-6


def test_an_eager_acceptance_rule_fails(expected):
    """Accepting any draft the target gives at least 10% (instead of exactly p(d)) is biased."""

    def eager(probs, tokens, drafts):
        tokens = tokens.clone()
        for i, d in enumerate(drafts):
            if probs[i, d] >= 0.1:
                tokens[i] = d
        return tokens

    samples = sample_many(proposer=sim.random_drafts(3), accept=eager)
    assert sim.chi_square_p_value(samples, expected) < 1e-6


def test_seeded_speculation_makes_the_plain_tokens():
    """With the generator rewound to its last accepted row, a seed makes the same tokens with
    and without speculation (and without the rewind it does not)."""
    plain = [sim.decode(seed, 8, None) for seed in range(40)]
    spec = [sim.decode(seed, 8, sim.random_drafts(3)) for seed in range(40)]
    assert spec == plain
    unrewound = [sim.decode(seed, 8, sim.random_drafts(3), rewind=False) for seed in range(40)]
    assert unrewound != plain
    again = [sim.decode(seed, 8, sim.random_drafts(3)) for seed in range(40)]
    assert again == spec


# ---- the residual path: a proposer with a real draft distribution q ------------------------


def residual_samples(p: torch.Tensor, q: torch.Tensor, num: int, seed: int) -> torch.Tensor:
    """One verify row per sample: draft d ~ q, then rejection_sample against p."""
    g = torch.Generator().manual_seed(seed)
    drafts = torch.multinomial(q, num, replacement=True, generator=g)  # [num]
    target = p.expand(num, -1).contiguous()
    draft_probs = q.expand(num, -1).contiguous()
    noise = torch.empty(num, p.shape[0]).exponential_(generator=g)
    uniform = torch.rand(num, generator=g)
    return rejection_sample(target, drafts, noise, draft_probs, uniform)


def fit(tokens: torch.Tensor, p: torch.Tensor) -> float:
    expected = {(t,): float(pt) for t, pt in enumerate(p.tolist())}
    return sim.chi_square_p_value([(t,) for t in tokens.tolist()], expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_residual_draw_makes_the_target_distribution(seed):
    g = torch.Generator().manual_seed(100 + seed)
    p = torch.softmax(torch.randn(12, generator=g) * 1.5, dim=0)
    q = torch.softmax(torch.randn(12, generator=g) * 1.5, dim=0)
    tokens = residual_samples(p, q, 20000, seed)
    assert fit(tokens, p) > THRESHOLD


def test_a_wrong_residual_fails():
    """Accepting with min(1, p/q) but redrawing from p (not max(0, p - q)) is biased."""
    g = torch.Generator().manual_seed(7)
    p = torch.softmax(torch.randn(12, generator=g) * 1.5, dim=0)
    q = torch.softmax(torch.randn(12, generator=g) * 1.5, dim=0)
    num = 20000
    gen = torch.Generator().manual_seed(8)
    drafts = torch.multinomial(q, num, replacement=True, generator=gen)
    target = p.expand(num, -1).contiguous()
    noise = torch.empty(num, 12).exponential_(generator=gen)
    uniform = torch.rand(num, generator=gen)
    ratio = (p[drafts] / q[drafts]).clamp_max(1.0)
    wrong = torch.where(uniform < ratio, drafts, (target / noise).argmax(dim=-1))
    assert fit(wrong, p) < 1e-6
    right = rejection_sample(target, drafts, noise, q.expand(num, -1).contiguous(), uniform)
    assert fit(right, p) > THRESHOLD


def test_one_hot_q_and_no_q_agree_in_distribution():
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(10, generator=g), dim=0)
    num = 20000
    drafts = torch.full((num,), 4, dtype=torch.int64)
    noise = torch.empty(num, 10).exponential_(generator=g)
    uniform = torch.rand(num, generator=g)
    one_hot = torch.nn.functional.one_hot(drafts, 10).float()
    target = p.expand(num, -1).contiguous()
    with_q = rejection_sample(target, drafts, noise, one_hot, uniform)
    without = rejection_sample(target, drafts, noise)
    assert fit(with_q, p) > THRESHOLD and fit(without, p) > THRESHOLD
    # Acceptance probability p(d) either way.
    for tokens in (with_q, without):
        assert abs(float((tokens == 4).float().mean()) - float(p[4])) < 0.015


def test_rows_without_a_draft_draw_from_p_and_greedy_rows_take_the_argmax():
    p = torch.tensor([[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    q = torch.tensor([[1.0, 0.0, 0.0], [0.3, 0.3, 0.4]])
    gens = [torch.Generator().manual_seed(0), None]
    shared = torch.Generator().manual_seed(1)
    noise, uniform = draw_noise(gens, 3, torch.device("cpu"), shared, with_uniform=True)
    assert uniform is not None
    out = rejection_sample(p, torch.tensor([0, NO_DRAFT]), noise, q, uniform)
    assert out[0] == 1  # p(0) = 0: rejected, and the residual is the argmax's one-hot
    # The row without a draft is the plain exponential-race draw from p.
    assert out[1] == (p[1] / noise[1]).argmax()


def test_bad_inputs_are_refused():
    p = torch.full((2, 4), 0.25)
    noise = torch.ones(2, 4)
    with pytest.raises(ValueError, match=r"draft token id 4 is outside \[0, 3\]"):
        rejection_sample(p, torch.tensor([4, 0]), noise)
    with pytest.raises(ValueError, match="disagree"):
        rejection_sample(p, torch.tensor([0]), noise)
    with pytest.raises(ValueError, match="uniform draw"):
        rejection_sample(p, torch.tensor([0, 1]), noise, p)
