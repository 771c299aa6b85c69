"""A SamplingBatch on the CPU with defaults for what a test leaves out (shared by the tests)."""

from __future__ import annotations

from kestrel.sample import SamplingBatch


def build(params, vocab_size, generators=None, outputs=None, prompts=None, eos=None):
    n = len(params)
    return SamplingBatch.build(
        params,
        prompts if prompts is not None else [[]] * n,
        outputs if outputs is not None else [[]] * n,
        generators if generators is not None else [None] * n,
        vocab_size,
        "cpu",
        eos,
    )
