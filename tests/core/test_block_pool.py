import pytest
from kestrel._core import BlockPool


def test_block_ids_reused_after_free():
    pool = BlockPool(4)
    assert pool.allocate(3) == [0, 1, 2]
    pool.release([1])
    assert pool.free_list() == [1, 3]
    assert pool.allocate(2) == [1, 3]
    assert pool.allocate(1) is None  # fails cleanly
    assert pool.num_free_blocks == 0


def test_ref_counts_under_sharing():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.touch(b)
    assert pool.ref_count(b) == 2
    pool.release([b])
    assert pool.ref_count(b) == 1 and pool.num_free_blocks == 1
    pool.release([b])
    assert pool.ref_count(b) == 0 and pool.num_free_blocks == 2


def test_release_of_unused_block_is_an_error():
    pool = BlockPool(2)
    with pytest.raises(ValueError, match="not in use"):
        pool.release([0])
    with pytest.raises(ValueError):
        BlockPool(0)
