"""Sampler: greedy, per-request reproducibility, distribution, min_tokens and logprobs."""

from __future__ import annotations

import pytest
import torch

from kestrel.sample import Sampler, make_generator
from kestrel.sampling_params import SamplingParams as P
from tests.sampling.helpers import build


def test_greedy_equals_argmax_for_any_dtype():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 100, generator=gen)
    params = [P(temperature=0.0)] * 4 + [P(temperature=1e-6, top_k=3)] * 4
    batch = build(params, 100)
    assert batch.all_greedy
    out = Sampler()(logits, batch)
    assert out.sampled_token_ids.dtype == torch.int64
    assert torch.equal(out.sampled_token_ids, logits.argmax(dim=-1))
    bf16 = logits.to(torch.bfloat16)
    assert torch.equal(Sampler()(bf16, batch).sampled_token_ids, bf16.float().argmax(dim=-1))
    assert out.logprobs is None and out.top_logprobs is None and out.top_logprob_ids is None


def test_greedy_rows_in_mixed_batch_take_argmax_and_consume_no_randomness():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 30, generator=gen)
    original = logits.clone()
    seeded = make_generator(5, "cpu")
    state = seeded.get_state()
    shared = torch.Generator().manual_seed(11)
    shared_state = shared.get_state()
    params = [P(temperature=0, seed=5), P(temperature=0.9), P(temperature=0), P(temperature=0.9)]
    batch = build(params, 30, generators=[seeded, None, None, None])
    out = Sampler(shared)(logits, batch)
    assert out.sampled_token_ids[[0, 2]].tolist() == logits[[0, 2]].argmax(-1).tolist()
    assert torch.equal(seeded.get_state(), state)  # the greedy row drew nothing
    assert not torch.equal(shared.get_state(), shared_state)  # the sampling rows did
    assert torch.equal(logits, original)  # the caller's logits are never modified


def _run_request_x(layout: list[str], steps: int = 6) -> list[int]:
    """Tokens of seeded request X over `steps` steps, batched with the rows named in `layout`.

    Row kinds: "X" the request under test, "s" shared-generator sampling, "g" greedy,
    "o" another seeded request. Other rows get logits that differ per scenario.
    """
    vocab = 64
    base = torch.Generator().manual_seed(100)
    x_logits = [torch.randn(vocab, generator=base) * 2 for _ in range(steps)]
    noise_gen = torch.Generator().manual_seed(len(layout) * 7919 + layout.index("X"))
    kinds = {
        "X": P(seed=7, temperature=1.3, top_k=40, top_p=0.95, repetition_penalty=1.2),
        "s": P(temperature=1.0, min_p=0.02),
        "g": P(temperature=0.0),
        "o": P(seed=9, temperature=0.7, top_p=0.8),
    }
    params = [kinds[k] for k in layout]
    generators = [make_generator(p.seed, "cpu") if p.seed is not None else None for p in params]
    sampler = Sampler(torch.Generator().manual_seed(len(layout)))
    outputs: list[list[int]] = [[] for _ in layout]
    x_row = layout.index("X")
    for step in range(steps):
        logits = torch.randn(len(layout), vocab, generator=noise_gen) * 3
        logits[x_row] = x_logits[step]
        batch = build(
            params, vocab, generators=generators, outputs=outputs, prompts=[[1, 2, 3]] * len(layout)
        )
        tokens = sampler(logits, batch).sampled_token_ids.tolist()
        for row, token in enumerate(tokens):
            outputs[row].append(token)
    return outputs[x_row]


def test_seeded_request_reproduces_whatever_the_batch():
    alone = _run_request_x(["X"])
    assert len(set(alone)) > 2  # the request really samples; a constant would prove nothing
    for layout in (["s", "g", "X", "o"], ["X", "o", "s"], ["g", "s", "s", "o", "g", "s", "X"]):
        assert _run_request_x(layout) == alone, layout


def test_different_seed_gives_different_tokens():
    logits = torch.zeros(1, 1000)  # uniform: two seeds agreeing 8 times is (1/1000)^8
    runs = []
    for seed in (7, 8):
        gen = make_generator(seed, "cpu")
        batch = build([P(seed=seed)], 1000, generators=[gen])
        runs.append([Sampler()(logits, batch).sampled_token_ids.item() for _ in range(8)])
    assert runs[0] != runs[1]


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_empirical_distribution_matches_softmax_over_temperature():
    # 6 categories -> 5 degrees of freedom; chi2 > 25 has probability < 1.5e-4.
    logits_row = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0])
    temperature, draws = 0.8, 6000
    probs = torch.softmax(logits_row / temperature, dim=-1)
    batch = build([P(temperature=temperature)] * draws, 6)
    tokens = Sampler(torch.Generator().manual_seed(1234))(logits_row.expand(draws, 6), batch)
    counts = torch.bincount(tokens.sampled_token_ids, minlength=6).double()
    assert _chi_square(counts, probs.double()) < 25.0

    # The same through per-row generators (the seeded path), top_k=3 renormalizes.
    draws = 1500
    params = [P(temperature=temperature, top_k=3, seed=s) for s in range(draws)]
    gens = [make_generator(s, "cpu") for s in range(draws)]
    out = Sampler()(logits_row.expand(draws, 6), build(params, 6, generators=gens))
    counts = torch.bincount(out.sampled_token_ids, minlength=6).double()
    assert counts[[2, 3, 5]].sum() == 0  # outside the top 3 (tokens 4, 0, 1)
    top3 = torch.softmax(logits_row[[4, 0, 1]] / temperature, dim=-1).double()
    assert _chi_square(counts[[4, 0, 1]], top3) < 14.0  # 2 dof: P(chi2 > 14) < 1e-3


def test_min_tokens_blocks_eos_and_stop_ids_in_sampling():
    logits = torch.zeros(4, 10)
    logits[:, 9] = 50.0  # eos dominates
    logits[:, 8] = 40.0  # stop token id is next
    params = [
        P(temperature=0, min_tokens=3, stop_token_ids=[8]),
        P(temperature=0, min_tokens=3, stop_token_ids=[8]),
        P(temperature=1.0, min_tokens=2, stop_token_ids=[8]),
        P(temperature=1.0, min_tokens=2),
    ]
    outputs = [[1], [1, 2, 3], [1], [1]]
    batch = build(params, 10, outputs=outputs, eos=[[9]] * 4)
    tokens = Sampler(torch.Generator().manual_seed(0))(logits, batch).sampled_token_ids
    assert tokens[0].item() not in (8, 9) and tokens[1].item() == 9
    assert tokens[2].item() not in (8, 9) and tokens[3].item() == 8


def test_logprobs_are_log_softmax_of_raw_logits_with_sorted_top_k():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 50, generator=gen) * 2
    params = [
        P(logprobs=None),
        P(logprobs=0, temperature=0, logit_bias={7: 100.0}),
        P(logprobs=3, repetition_penalty=1.5, top_k=5),
        P(logprobs=5, temperature=0.5),
        P(logprobs=2, presence_penalty=1.0),
    ]
    batch = build(params, 50, outputs=[[1, 2]] * 5)
    out = Sampler(torch.Generator().manual_seed(4))(logits, batch)
    assert out.sampled_token_ids[1].item() == 7  # the bias decided the token ...
    reference = torch.log_softmax(logits.double(), dim=-1)
    sampled = out.sampled_token_ids
    expected = reference[torch.arange(5), sampled]
    # ... but its logprob is the raw one, not ~0 as the biased distribution would say.
    assert expected[1].item() < -0.5
    assert out.logprobs.dtype == torch.float32
    torch.testing.assert_close(out.logprobs.double(), expected, rtol=0, atol=1e-5)
    assert out.top_logprob_ids.shape == (5, 5) and out.top_logprobs.shape == (5, 5)
    assert torch.equal(out.top_logprob_ids, logits.argsort(dim=-1, descending=True)[:, :5])
    assert bool((out.top_logprobs[:, :-1] > out.top_logprobs[:, 1:]).all())
    torch.testing.assert_close(
        out.top_logprobs.double(), reference.gather(1, out.top_logprob_ids), rtol=0, atol=1e-5
    )


def test_top_logprobs_are_clamped_to_vocab_and_zero_means_sampled_only():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    out = Sampler()(logits, build([P(logprobs=20, temperature=0)], 3))
    assert out.top_logprob_ids.tolist() == [[2, 1, 0]]
    out = Sampler()(logits, build([P(logprobs=0, temperature=0)], 3))
    assert out.top_logprob_ids.shape == (1, 0) and out.logprobs.shape == (1,)
    torch.testing.assert_close(out.logprobs, torch.log_softmax(logits, -1)[:, 2])


def test_bad_logits_shape_and_seed_raise():
    batch = build([P(), P()], 10)
    with pytest.raises(ValueError, match=r"logits shape \(3, 10\) .* expected \(2, 10\)"):
        Sampler()(torch.zeros(3, 10), batch)
    with pytest.raises(ValueError, match=r"seed = 1.5 is invalid"):
        make_generator(1.5, "cpu")
