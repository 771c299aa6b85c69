"""DraftRows from a verify step's arrays, and InputBatch.gather with drafts against
SamplingBatch.build with the drafts appended to each row's output (the reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kestrel.runner.input_batch import InputBatch
from kestrel.sample import SamplingBatch
from kestrel.sampling_params import SamplingParams
from kestrel.spec.draft_rows import DraftRows


def test_rows_of_a_drafted_request_assume_the_drafts_before_them():
    # Request A (slot 2): plain row. Request B (slot 0): last token 7, drafts 8, 9, 10.
    # Request C (slot 1): last token 3, draft 4. Input ids hold a prefill chunk first.
    input_ids = np.array([50, 51, 52, 5, 7, 8, 9, 10, 3, 4])
    logits_indices = np.array([3, 4, 5, 6, 7, 8, 9])
    rows = DraftRows.from_step([2, 0, 0, 0, 0, 1, 1], input_ids, logits_indices)
    assert rows is not None
    assert rows.offsets.tolist() == [0, 0, 1, 2, 3, 0, 1]
    assert [rows.drafts_before(r) for r in range(7)] == [[], [], [8], [8, 9], [8, 9, 10], [], [4]]
    one = rows.row(4)
    assert one.offsets.tolist() == [3] and one.drafts_before(0) == [8, 9, 10]


def test_no_repeated_slot_means_no_drafts():
    assert DraftRows.from_step([0, 1, 2], np.arange(3), np.arange(3)) is None
    with pytest.raises(ValueError, match="2 slots for 3 logits indices"):
        DraftRows.from_step([0, 0], np.arange(3), np.arange(3))


PARAMS = [
    SamplingParams(temperature=0.7, repetition_penalty=1.4, seed=1),
    SamplingParams(temperature=0.0, frequency_penalty=0.5, presence_penalty=0.2, min_tokens=3),
    SamplingParams(temperature=1.0, min_tokens=5, stop_token_ids=[6], logit_bias={2: 1.0}),
    SamplingParams(temperature=0.5),
]
PROMPTS = [[1, 2, 3], [4, 4, 5], [6, 7], [1]]
OUTPUTS = [[9, 9], [3], [1, 2, 8], []]
EOS = [0]


@pytest.mark.parametrize("slot_runs", [[0, 0, 0, 1, 1, 2, 2, 2, 3], [1, 1, 1, 1, 3, 2, 0, 0]])
def test_gather_with_drafts_equals_build_with_the_drafts_as_output(slot_runs):
    vocab = 12
    batch_state = InputBatch(4, vocab, "cpu")
    for s in range(4):
        batch_state.add(s, PARAMS[s], PROMPTS[s], None, EOS, OUTPUTS[s])
    rng = np.random.default_rng(len(slot_runs))
    row_inputs = rng.integers(0, vocab, size=len(slot_runs))
    drafts = DraftRows.from_runs(np.asarray(slot_runs), row_inputs)
    got = batch_state.gather(slot_runs, drafts=drafts)
    want = SamplingBatch.build(
        [PARAMS[s] for s in slot_runs],
        [PROMPTS[s] for s in slot_runs],
        [OUTPUTS[s] + drafts.drafts_before(r) for r, s in enumerate(slot_runs)],
        [None] * len(slot_runs),
        vocab,
        "cpu",
        [EOS] * len(slot_runs),
    )
    assert torch.equal(got.output_token_counts, want.output_token_counts)
    assert torch.equal(got.prompt_token_mask, want.prompt_token_mask)
    banned = sorted(zip(got.banned_rows.tolist(), got.banned_ids.tolist()))
    assert banned == sorted(zip(want.banned_rows.tolist(), want.banned_ids.tolist()))
    assert got.random_row_ids == want.random_row_ids
    plain = batch_state.gather(slot_runs)  # without drafts: the history alone
    if drafts.pair_rows.shape[0]:
        assert not torch.equal(plain.output_token_counts, want.output_token_counts)


def test_a_draft_outside_the_vocabulary_is_refused():
    batch_state = InputBatch(2, 8, "cpu")
    batch_state.add(0, PARAMS[0], PROMPTS[0], None, EOS)
    drafts = DraftRows.from_runs(np.array([0, 0]), np.array([1, 99]))
    with pytest.raises(ValueError, match=r"draft token id lies outside \[0, 7\]"):
        batch_state.gather([0, 0], drafts=drafts)
