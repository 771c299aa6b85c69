"""The decode split planner and the per-sequence split arithmetic the kernels use (pure Python:
runs in CI without a GPU)."""

import random

import pytest

from kestrel.ops.attention_cuda import (
    MIN_SPLIT_TOKENS,
    decode_split_len,
    decode_split_ranges,
    decode_valid_splits,
    heads_per_block,
    plan_decode_splits,
)

WAVE = 4 * 132  # 4 resident blocks on each of an H100's 132 SMs


def test_fills_one_wave_for_a_small_batch():
    # 16 seqs x 8 kv heads = 128 blocks per split: 4 splits fill 512 of 528 slots.
    assert plan_decode_splits(16, 32, 8, 2048, WAVE, 4) == 4
    assert decode_split_len(2048, 4) == 512


def test_large_batch_needs_no_split():
    assert plan_decode_splits(64, 32, 8, 8192, WAVE, 4) == 1


def test_single_sequence_splits_down_to_the_minimum():
    splits = plan_decode_splits(1, 32, 8, 2048, WAVE, 4)
    assert splits == 2048 // MIN_SPLIT_TOKENS
    assert decode_split_len(2048, splits) == MIN_SPLIT_TOKENS


@pytest.mark.parametrize("num_seqs", [1, 3, 16, 100])
@pytest.mark.parametrize("max_seq_len", [1, 63, 64, 65, 1000, 16384, 131072])
@pytest.mark.parametrize("heads", [1, 4, 16])
def test_splits_cover_the_longest_context(num_seqs, max_seq_len, heads):
    splits = plan_decode_splits(num_seqs, 28, 4, max_seq_len, WAVE, heads)
    assert splits >= 1
    split_len = decode_split_len(max_seq_len, splits)
    assert splits * split_len >= max_seq_len
    # The longest sequence leaves no split of the grid empty.
    assert decode_valid_splits(max_seq_len, splits) == splits
    assert (splits - 1) * split_len < max_seq_len
    if splits > 1:
        assert split_len >= MIN_SPLIT_TOKENS


def _covers_exactly_once(seq_len: int, num_splits: int, min_split_len: int) -> None:
    ranges = decode_split_ranges(seq_len, num_splits, min_split_len)
    assert len(ranges) == num_splits  # one per block of the grid's z dimension
    hits = [0] * seq_len
    nonempty = []
    for z, (start, end) in enumerate(ranges):
        if start < end:
            nonempty.append(z)
            for pos in range(start, end):
                hits[pos] += 1
    assert hits == [1] * seq_len, (seq_len, num_splits, min_split_len)
    nvalid = decode_valid_splits(seq_len, num_splits, min_split_len)
    # The merge reads splits 0 .. nvalid - 1: exactly the non-empty ones, a prefix of the grid.
    assert nonempty == list(range(nvalid))
    split_len = decode_split_len(seq_len, num_splits, min_split_len)
    assert split_len >= min_split_len
    if nvalid > 1:  # no split shorter than the minimum but the last
        assert all(end - start == split_len for start, end in ranges[: nvalid - 1])


def test_per_sequence_splits_cover_every_token_once():
    rng = random.Random(11)
    for _ in range(2000):
        num_splits = rng.choice([1, 2, 3, 7, 64, rng.randint(1, 600)])
        max_seq_len = rng.randint(1, 40000)
        for seq_len in (1, max_seq_len, rng.randint(1, max_seq_len)):
            _covers_exactly_once(seq_len, num_splits, MIN_SPLIT_TOKENS)
        _covers_exactly_once(rng.randint(1, 3000), num_splits, rng.randint(1, 300))


@pytest.mark.parametrize("seq_len", [1, 2, 63, 64, 65, 127, 128, 129, 1000, 4095, 4096, 4097])
@pytest.mark.parametrize("num_splits", [1, 2, 5, 16, 64, 512])
def test_per_sequence_splits_edges(seq_len, num_splits):
    _covers_exactly_once(seq_len, num_splits, MIN_SPLIT_TOKENS)


def test_short_context_in_a_long_plan_spreads_over_full_splits():
    """A graph planned for a 32k context serves a 1000-token one: 16 splits of 64 tokens (the
    rest empty), not one split of the planned length."""
    splits = 512  # what a batch of one at 32k plans
    assert decode_split_len(1000, splits) == MIN_SPLIT_TOKENS
    assert decode_valid_splits(1000, splits) == 16
    assert decode_split_len(32768, splits) == 64
    assert decode_valid_splits(20, 4) == 1 and decode_split_len(20, 4) == MIN_SPLIT_TOKENS


def test_the_longest_sequence_keeps_the_host_split():
    """For the sequence of max_seq_len the device formula gives the split length the host plan
    implies, ceil(max_seq_len / num_splits)."""
    for max_seq_len in (65, 100, 1000, 2049, 8191, 16384, 131071):
        for num_seqs in (1, 2, 8, 33):
            splits = plan_decode_splits(num_seqs, 32, 8, max_seq_len, WAVE, 4)
            assert decode_split_len(max_seq_len, splits) == -(-max_seq_len // splits)


def test_heads_per_block():
    assert [heads_per_block(g, 128) for g in (1, 2, 3, 4, 7, 16)] == [1, 2, 4, 16, 16, 16]
    assert [heads_per_block(g, 256) for g in (1, 3, 4, 7)] == [1, 4, 4, 8]
