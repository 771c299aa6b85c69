"""Logit edits (bias, min_tokens, penalties) against hand-computed values, and batch building."""

from __future__ import annotations

import pytest
import torch

from kestrel.sample import SamplingBatch, apply_logits_processors
from kestrel.sampling_params import SamplingParams as P

INF = float("inf")
V = 6


def build(params, prompts, outputs, eos=None, vocab_size=V):
    return SamplingBatch.build(
        params, prompts, outputs, [None] * len(params), vocab_size, "cpu", eos
    )


def process(logits_rows, params, prompts, outputs, eos=None):
    logits = torch.tensor(logits_rows, dtype=torch.float32)
    batch = build(params, prompts, outputs, eos)
    return apply_logits_processors(logits.clone(), batch)


def test_logit_bias_adds_to_listed_tokens_only():
    out = process([[1.0, -2.0, 0.5, 3.0, 0.0, 4.0]], [P(logit_bias={1: 2.5, 4: -100})], [[]], [[]])
    assert out.tolist() == [[1.0, 0.5, 0.5, 3.0, -100.0, 4.0]]


def test_repetition_penalty_divides_positive_multiplies_negative_over_prompt_and_output():
    # prompt has 0 and 3, output has 3 and 5: tokens 0, 3, 5 are penalized; 1, 2, 4 are not.
    row = [2.0, 3.0, -1.0, -1.5, 5.0, 0.5]
    out = process([row], [P(repetition_penalty=2.0)], [[0, 3]], [[3, 5]])
    assert out.tolist() == [[1.0, 3.0, -1.0, -3.0, 5.0, 0.25]]


def test_presence_and_frequency_penalties_use_output_counts_only():
    # output: token 1 three times, token 2 once; prompt token 0 must not be penalized.
    row = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    params = P(presence_penalty=0.5, frequency_penalty=0.25)
    out = process([row], [params], [[0, 0]], [[1, 1, 1, 2]])
    # token 1: 1 - 0.25*3 - 0.5 = -0.25; token 2: 1 - 0.25 - 0.5 = 0.25
    assert out.tolist() == [[1.0, -0.25, 0.25, 1.0, 1.0, 1.0]]


def test_negative_penalties_reward_repeats():
    params = P(presence_penalty=-1.0, frequency_penalty=-0.5)
    out = process([[0.0] * V], [params], [[]], [[4, 4]])
    assert out.tolist() == [[0.0, 0.0, 0.0, 0.0, 2.0, 0.0]]


def test_order_is_bias_then_mask_then_repetition_then_additive():
    # token 2: -1 + bias 2 = 1 -> repetition /2 = 0.5 -> presence 0.5, frequency 0.25*2 -> -0.5
    # (repetition before bias would give -1*2 + 2 = 0 -> -1.0)
    # token 5 is a stop id with min_tokens unmet: -inf survives every later step.
    params = P(
        logit_bias={2: 2.0, 5: 50.0},
        repetition_penalty=2.0,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        min_tokens=4,
        stop_token_ids=[5],
    )
    out = process([[1.0, 1.0, -1.0, 1.0, 1.0, 9.0]], [params], [[0]], [[2, 2, 5]])
    # token 0 (prompt only): 1/2 = 0.5, no additive penalty; token 5: -inf.
    assert out.tolist() == [[0.5, 1.0, -0.5, 1.0, 1.0, -INF]]


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    rows = [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]] * 5
    params = [
        P(min_tokens=3, stop_token_ids=[4]),  # 2 outputs < 3: eos 5 and stop 4 masked
        P(min_tokens=2, stop_token_ids=[4]),  # 2 outputs: reached, nothing masked
        P(min_tokens=3, ignore_eos=True),  # eos is an ordinary token under ignore_eos
        P(min_tokens=3, ignore_eos=True, stop_token_ids=[1]),  # stop ids still masked
        P(min_tokens=1),  # 0 outputs, eos ids 0 and 5 masked
    ]
    outputs = [[0, 1], [0, 1], [0, 1], [0, 1], []]
    eos = [[5], [5], [5], [5], [0, 5]]
    out = process(rows, params, [[]] * 5, outputs, eos)
    assert out.tolist() == [
        [1.0, 2.0, 3.0, 4.0, -INF, -INF],
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        [1.0, -INF, 3.0, 4.0, 5.0, 6.0],
        [-INF, 2.0, 3.0, 4.0, 5.0, -INF],
    ]


def test_neutral_rows_are_bitwise_unchanged_next_to_penalized_rows():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=gen)
    params = [P(), P(repetition_penalty=1.3, presence_penalty=0.7, frequency_penalty=-0.3), P()]
    prompts = [[1, 2, 3], [4, 5], [6]]
    outputs = [[7, 7, 8], [5, 9, 9], [10]]
    batch = SamplingBatch.build(params, prompts, outputs, [None] * 3, 50, "cpu", [[0]] * 3)
    out = apply_logits_processors(logits.clone(), batch)
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    assert not torch.equal(out[1], logits[1])
    # Row 1 against an independent float64 computation.
    ref = logits[1].double().clone()
    for t in (4, 5, 9):
        ref[t] = ref[t] / 1.3 if ref[t] > 0 else ref[t] * 1.3
    for t, count in {5: 1, 9: 2}.items():
        ref[t] -= -0.3 * count + 0.7
    torch.testing.assert_close(out[1].double(), ref, rtol=1e-6, atol=1e-6)


def test_batch_flags_and_counts():
    params = [P(temperature=0.0), P(top_k=3, logprobs=2), P(frequency_penalty=0.5, logprobs=5)]
    batch = build(params, [[1], [2], [3, 3]], [[4, 4], [], [3, 1, 3]])
    assert batch.random_row_ids == [1, 2] and batch.random_rows.tolist() == [1, 2]
    assert not batch.all_greedy and batch.use_filters and batch.use_additive_penalties
    assert not batch.use_repetition_penalty and batch.prompt_token_mask is None
    assert batch.max_num_logprobs == 5
    assert batch.top_k.dtype == torch.int32 and batch.top_k.tolist() == [0, 3, 0]
    # counts are filled only for penalized rows; outputs only, not prompts.
    assert batch.output_token_counts.tolist() == [[0] * 6, [0] * 6, [0, 1, 0, 2, 0, 0]]

    greedy = build([P(temperature=0), P(temperature=1e-6, top_k=-1)], [[], []], [[], []])
    assert greedy.all_greedy and greedy.random_rows is None and greedy.max_num_logprobs == -1
    assert not greedy.has_logit_edits and greedy.output_token_counts is None


def test_build_rejects_out_of_vocab_and_mismatched_lengths():
    with pytest.raises(ValueError, match=r"logit_bias has token id 6; allowed: \[0, 5\]"):
        build([P(logit_bias={6: 1.0})], [[]], [[]])
    with pytest.raises(ValueError, match=r"stop_token_ids has token id 9"):
        build([P(stop_token_ids=[9])], [[]], [[]])
    with pytest.raises(ValueError, match="output_ids has 2 rows but params has 1"):
        build([P()], [[]], [[], []])
    with pytest.raises(ValueError, match="outside"):
        build([P(repetition_penalty=1.5)], [[6]], [[]])
