"""The decode split planner (pure Python: runs in CI without a GPU)."""

import pytest

from kestrel.ops.attention_cuda import MIN_SPLIT_TOKENS, heads_per_block, plan_decode_splits

WAVE = 4 * 132  # 4 resident blocks on each of an H100's 132 SMs


def test_fills_one_wave_for_a_small_batch():
    # 16 seqs x 8 kv heads = 128 blocks per split: 4 splits fill 512 of 528 slots.
    assert plan_decode_splits(16, 32, 8, 2048, WAVE, 4) == (4, 512)


def test_large_batch_needs_no_split():
    assert plan_decode_splits(64, 32, 8, 8192, WAVE, 4) == (1, 8192)


def test_single_sequence_splits_down_to_the_minimum():
    splits, split_len = plan_decode_splits(1, 32, 8, 2048, WAVE, 4)
    assert (splits, split_len) == (2048 // MIN_SPLIT_TOKENS, MIN_SPLIT_TOKENS)


@pytest.mark.parametrize("num_seqs", [1, 3, 16, 100])
@pytest.mark.parametrize("max_seq_len", [1, 63, 64, 65, 1000, 16384, 131072])
@pytest.mark.parametrize("heads", [1, 4, 16])
def test_splits_cover_the_context(num_seqs, max_seq_len, heads):
    splits, split_len = plan_decode_splits(num_seqs, 28, 4, max_seq_len, WAVE, heads)
    assert splits >= 1 and splits * split_len >= max_seq_len
    assert (splits - 1) * split_len < max_seq_len  # no split starts past the context
    if splits > 1:
        assert split_len >= MIN_SPLIT_TOKENS


def test_heads_per_block():
    assert [heads_per_block(g, 128) for g in (1, 2, 3, 4, 7, 16)] == [1, 2, 4, 16, 16, 16]
    assert [heads_per_block(g, 256) for g in (1, 3, 4, 7)] == [1, 4, 4, 8]
