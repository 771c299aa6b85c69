"""The speculative sampling checks of test_rejection_sampler.py with the sampling on the GPU
(CUDA generators: their Philox state is what the rewind saves and restores)."""

from __future__ import annotations

import pytest

from tests.spec import sim

pytestmark = pytest.mark.cuda

NUM_TRIALS = 1500
THRESHOLD = 1e-3


def test_speculative_sampling_on_cuda_matches_the_exact_distribution():
    expected = sim.exact_distribution(3)
    samples = [
        tuple(sim.decode(s, 3, sim.random_drafts(3), device="cuda")) for s in range(NUM_TRIALS)
    ]
    assert sim.chi_square_p_value(samples, expected) > THRESHOLD
    wrong = [
        tuple(sim.decode(s, 3, sim.random_drafts(3), draft_aware=False, device="cuda"))
        for s in range(NUM_TRIALS)
    ]
    assert sim.chi_square_p_value(wrong, expected) < 1e-4


def test_cuda_generators_rewind_to_the_plain_tokens():
    plain = [sim.decode(s, 8, None, device="cuda") for s in range(30)]
    spec = [sim.decode(s, 8, sim.random_drafts(3), device="cuda") for s in range(30)]
    assert spec == plain
    unrewound = [
        sim.decode(s, 8, sim.random_drafts(3), rewind=False, device="cuda") for s in range(30)
    ]
    assert unrewound != plain
