"""Grammar bitmasks applied to logits: the device unpacking equals a bit-by-bit reference."""

from __future__ import annotations

import numpy as np
import torch

from kestrel.structured.bitmask import GrammarMask, allowed_tokens, apply_bitmask


def _reference_allowed(bitmask: np.ndarray, vocab: int) -> np.ndarray:
    out = np.zeros((bitmask.shape[0], vocab), dtype=bool)
    for r in range(bitmask.shape[0]):
        for t in range(min(vocab, 32 * bitmask.shape[1])):
            out[r, t] = (int(bitmask[r, t // 32]) >> (t % 32)) & 1 == 1
    return out


def test_unpacking_matches_the_bits_and_pads_with_disallowed():
    rng = np.random.default_rng(0)
    bitmask = rng.integers(-(2**31), 2**31, size=(3, 5), dtype=np.int64).astype(np.int32)
    for vocab in (150, 160, 200):  # inside, exactly at, and past the bitmask's width
        got = allowed_tokens(torch.from_numpy(bitmask), vocab).numpy()
        assert np.array_equal(got, _reference_allowed(bitmask, vocab)), vocab


def test_apply_masks_only_the_constrained_rows():
    rng = np.random.default_rng(1)
    logits = torch.randn(4, 70)
    before = logits.clone()
    bitmask = rng.integers(-(2**31), 2**31, size=(2, 2), dtype=np.int64).astype(np.int32)
    apply_bitmask(logits, GrammarMask(np.array([3, 1]), bitmask))
    allowed = _reference_allowed(bitmask, 70)
    for k, row in enumerate((3, 1)):
        expected = torch.where(torch.from_numpy(allowed[k]), before[row], float("-inf"))
        assert torch.equal(logits[row], expected)
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])


def test_applier_on_cpu_equals_the_reference_path_and_checks_rows():
    """The runner's BitmaskApplier (on CPU: the reference op, no staging) equals apply_bitmask;
    rows out of range or repeated are refused, naming the range."""
    import pytest

    from kestrel.structured.bitmask import BitmaskApplier

    rng = np.random.default_rng(2)
    bitmask = rng.integers(-(2**31), 2**31, size=(3, 4), dtype=np.int64).astype(np.int32)
    mask = GrammarMask(np.array([4, 0, 2]), bitmask)
    logits = torch.randn(5, 130)  # wider than the bitmask (128 tokens): the rest disallowed
    expected = logits.clone()
    apply_bitmask(expected, mask)
    BitmaskApplier().apply(logits, mask)
    assert torch.equal(logits, expected)
    assert torch.isneginf(logits[[4, 0, 2], 128:]).all()
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        BitmaskApplier().apply(logits, GrammarMask(np.array([0, 5, 1]), bitmask))
    with pytest.raises(ValueError, match="distinct"):
        apply_bitmask(logits, GrammarMask(np.array([1, 1, 2]), bitmask))
