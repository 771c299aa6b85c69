"""The grammar-bitmask kernel (apply_token_bitmask) against the torch reference: bit-exact
(it only writes -inf), odd vocabularies, bitmasks narrower and wider than the vocabulary, a
subset of rows in any order, fp32 logits (what the sampler sees) and fp16/bf16, rows of the
logits that are not constrained left untouched (NaN-poisoned, bit for bit), and the staging
path of the model runner (BitmaskApplier: pinned buffer, one copy, one kernel)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kestrel.ops import _dispatch, apply_token_bitmask, apply_token_bitmask_reference
from kestrel.structured.bitmask import BitmaskApplier, GrammarMask, apply_bitmask
from tests.kernels.helpers import set_kernel_env

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def _allow_unverified(monkeypatch):
    """The kernel is off by default until a GPU run verifies it (_dispatch.UNVERIFIED_OPS):
    these tests are that run."""
    # Through the environment: the spy fixture re-reads the settings from it.
    set_kernel_env(monkeypatch, _dispatch.UNVERIFIED_ENV, "1")


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _random_bitmask(rows: int, words: int, gen: torch.Generator, density: float) -> torch.Tensor:
    bits = torch.rand(rows, words * 32, generator=gen, device="cuda") < density
    weights = (1 << torch.arange(32, device="cuda", dtype=torch.int64)).view(1, 1, 32)
    packed = (bits.view(rows, words, 32).long() * weights).sum(-1)  # [rows, words], < 2**32
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)


def _logits(num: int, vocab: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(num, vocab, generator=gen, device="cuda").to(dtype)
    x[:, ::97] = float("nan")  # poisoned values: allowed ones must survive bit for bit
    x[:, 5::89] = float("inf")
    return x


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    width = {4: torch.int32, 2: torch.int16}[a.element_size()]
    return torch.equal(a.view(width), b.view(width))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "vocab, words",
    [
        (151_936, 4748),  # Qwen2.5: bitmask exactly as wide
        (151_936, 4700),  # bitmask narrower: tokens past 32 * W never allowed
        (32_001, 1001),  # odd vocab, bitmask wider than the vocabulary
        (50, 3),
        (1, 1),
        (40_000, 1250),
    ],
)
@pytest.mark.parametrize("density", [0.0, 0.01, 0.5, 1.0])
def test_kernel_matches_the_reference(dtype, vocab, words, density, gen, spy):
    num_logit_rows = 9
    rows = torch.tensor([7, 0, 3, 8], device="cuda", dtype=torch.int64)  # a subset, unordered
    bitmask = _random_bitmask(rows.shape[0], words, gen, density)
    logits = _logits(num_logit_rows, vocab, dtype, gen)
    original = logits.clone()
    expected = logits.clone()
    apply_token_bitmask_reference(expected, rows, bitmask)
    apply_token_bitmask(logits, rows, bitmask)
    assert spy.calls["apply_token_bitmask"] == 1
    assert _bits_equal(logits, expected)
    untouched = [r for r in range(num_logit_rows) if r not in rows.tolist()]
    assert _bits_equal(logits[untouched], original[untouched])


@pytest.mark.parametrize("num_rows", [1, 64, 300])
def test_every_row_and_single_rows(num_rows, gen, spy):
    vocab, words = 151_936, 4748
    bitmask = _random_bitmask(num_rows, words, gen, 0.3)
    logits = _logits(num_rows, vocab, torch.float32, gen)
    expected = logits.clone()
    rows = torch.arange(num_rows, device="cuda", dtype=torch.int64)
    apply_token_bitmask_reference(expected, rows, bitmask)
    apply_token_bitmask(logits, rows, bitmask)
    assert spy.calls["apply_token_bitmask"] == 1 and _bits_equal(logits, expected)


def test_row_stride_view_and_allowed_bits(gen, spy):
    """Logits as a row-strided view; a hand-made mask: only tokens 0, 33 and 63 allowed."""
    base = _logits(4, 100, torch.float32, gen)
    logits = base[:, :70]  # row stride 100
    bitmask = torch.zeros(2, 3, dtype=torch.int32, device="cuda")
    bitmask[:, 0] = 1
    bitmask[:, 1] = (1 << 1) | (-(1 << 31))  # bit 31 of word 1 is token 63
    before = base.clone()
    apply_token_bitmask(logits, torch.tensor([2, 1], device="cuda"), bitmask)
    assert spy.calls["apply_token_bitmask"] == 1
    for r in (1, 2):
        keep = torch.zeros(70, dtype=torch.bool, device="cuda")
        keep[[0, 33, 63]] = True
        assert torch.isneginf(logits[r][~keep]).all()
        assert _bits_equal(logits[r][keep], before[r, :70][keep])
    assert _bits_equal(base[[0, 3]], before[[0, 3]]) and _bits_equal(base[:, 70:], before[:, 70:])


def test_empty_mask_and_bad_arguments(gen):
    logits = _logits(2, 64, torch.float32, gen)
    before = logits.clone()
    apply_token_bitmask(
        logits,
        torch.zeros(0, dtype=torch.int64, device="cuda"),
        torch.zeros(0, 2, dtype=torch.int32, device="cuda"),
    )
    assert _bits_equal(logits, before)
    with pytest.raises(ValueError, match="int64"):
        apply_token_bitmask(logits, torch.zeros(1, dtype=torch.int32, device="cuda"),
                            torch.zeros(1, 2, dtype=torch.int32, device="cuda"))  # fmt: skip
    with pytest.raises(ValueError, match="2 rows for 1"):
        apply_token_bitmask(logits, torch.zeros(2, dtype=torch.int64, device="cuda"),
                            torch.zeros(1, 2, dtype=torch.int32, device="cuda"))  # fmt: skip
    # The launcher itself refuses what it cannot take (no launch, an error code).
    assert _dispatch.kernels is not None
    args = _dispatch.kernels.TokenBitmaskArgs()
    args.num_rows = 1
    assert _dispatch.kernels.apply_token_bitmask(args, 0) != 0


@pytest.mark.parametrize("num_rows", [1, 5, 64])
def test_applier_stages_through_pinned_memory(num_rows, gen, spy):
    """The runner's path, over several steps of growing and shrinking masks (the staging
    buffer is reused): equal to the reference path (`apply_bitmask`) bit for bit."""
    applier = BitmaskApplier()
    rng = np.random.default_rng(num_rows)
    vocab, words, sampled = 151_936, 4748, num_rows + 3
    for step in range(4):
        rows = rng.permutation(sampled)[: max(1, num_rows - step)].astype(np.int64)
        bitmask = rng.integers(-(2**31), 2**31, size=(rows.shape[0], words), dtype=np.int64)
        mask = GrammarMask(rows, bitmask.astype(np.int32))
        logits = _logits(sampled, vocab, torch.float32, gen)
        expected = logits.clone()
        apply_bitmask(expected, mask)
        applier.apply(logits, mask)
        assert _bits_equal(logits, expected), step
    assert spy.calls["apply_token_bitmask"] == 4
    assert applier._pinned is not None and applier._pinned.is_pinned()


def test_applier_refuses_bad_rows(gen):
    applier = BitmaskApplier()
    logits = _logits(3, 64, torch.float32, gen)
    bits = np.zeros((2, 2), dtype=np.int32)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        applier.apply(logits, GrammarMask(np.array([0, 3]), bits))
    with pytest.raises(ValueError, match="distinct"):
        applier.apply(logits, GrammarMask(np.array([1, 1]), bits))
