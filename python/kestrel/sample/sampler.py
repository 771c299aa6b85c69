"""The batched sampler: one call per step turns logits [S, V] into one token per row.

Pipeline per row i (the order is part of the contract):
  1. logit_bias -> min_tokens mask -> repetition penalty -> presence/frequency penalties
     (see `kestrel.sample.processors`),
  2. greedy rows (temperature < 1e-5) take the argmax here and consume no randomness,
  3. logits / temperature,
  4. min_p -> top_k -> top_p (see `kestrel.sample.topk_topp`),
  5. sample from softmax: token = argmax(probs / q) with q ~ Exp(1) of shape [V], which picks
     token t with probability probs[t] (the exponential form of the Gumbel-max trick).

Reproducibility: a seeded request owns a `torch.Generator` (see `make_generator`) that the engine
creates once; the runner's input batch holds it in the sequence's slot and passes it every step.
Its row draws its own [V] noise from that generator and every other step of the pipeline is
row-wise, so its tokens do not depend on the other rows or on its row position. Rows without a generator draw together from one shared generator in one call.
(On a GPU, row-wise kernels may round differently for different batch shapes; exact equality
across batch shapes is guaranteed on CPU.)

Logprobs are the fp32 log_softmax of the RAW logits given to the sampler (before any step above):
the sampled token's logprob and, when asked, the top-K (K = max over rows of `logprobs`, clamped
to V), sorted in descending order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kestrel.sample.batch import SamplingBatch
from kestrel.sample.processors import apply_logits_processors
from kestrel.sample.topk_topp import apply_min_p_top_k_top_p
from kestrel.sampling_params import SEED_RANGE


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [S] int64
    logprobs: torch.Tensor | None  # [S] float32, raw logprob of the sampled token
    top_logprob_ids: torch.Tensor | None  # [S, K] int64, sorted by logprob, descending
    top_logprobs: torch.Tensor | None  # [S, K] float32


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator on `device` seeded with `seed`, for one request's whole life."""
    lo, hi = SEED_RANGE
    if isinstance(seed, bool) or not isinstance(seed, int) or not lo <= seed <= hi:
        raise ValueError(f"seed = {seed!r} is invalid; allowed: an int in [{lo}, {hi}]")
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


class Sampler:
    """Stateless apart from the shared generator used by rows without their own."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        # None = torch's default generator of the logits' device.
        self.generator = generator

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """Sample one token per row of `logits` [S, V] (any float dtype; never modified)."""
        expected = (batch.num_rows, batch.vocab_size)
        if logits.dim() != 2 or tuple(logits.shape) != expected:
            raise ValueError(
                f"logits shape {tuple(logits.shape)} does not match the batch; expected {expected}"
            )
        processed = logits
        if batch.has_logit_edits:
            processed = apply_logits_processors(logits.to(torch.float32, copy=True), batch)
        sampled = processed.argmax(dim=-1)  # [S] int64; final for greedy rows
        if not batch.all_greedy:
            assert batch.random_rows is not None
            tokens = self._sample_rows(processed[batch.random_rows], batch)  # [R]
            sampled.index_copy_(0, batch.random_rows, tokens)
        return self.with_logprobs(logits, sampled, batch.max_num_logprobs)

    def _sample_rows(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Tokens [R] int64 for the non-greedy rows; `logits` [R, V] holds those rows."""
        rows = batch.random_rows
        assert rows is not None
        scaled = logits.to(torch.float32) / batch.temperature[rows].unsqueeze(1)  # [R, V]
        if batch.use_filters:
            scaled = apply_min_p_top_k_top_p(
                scaled, batch.min_p[rows], batch.top_k[rows], batch.top_p[rows]
            )
        probs = torch.softmax(scaled, dim=-1)  # [R, V]; filtered tokens have probability 0
        generators = [batch.generators[i] for i in batch.random_row_ids]
        noise = self._exponential_noise(generators, batch.vocab_size, logits.device)
        return (probs / noise).argmax(dim=-1)

    def _exponential_noise(
        self, generators: list[torch.Generator | None], vocab_size: int, device: torch.device
    ) -> torch.Tensor:
        """[R, V] float32 Exp(1) noise; row j comes from generators[j] or the shared one."""
        num_rows = len(generators)
        shared = [j for j, g in enumerate(generators) if g is None]
        if len(shared) == num_rows:
            noise = torch.empty(num_rows, vocab_size, device=device)
            noise.exponential_(generator=self.generator)
        else:
            noise = torch.empty(num_rows, vocab_size, device=device)
            if shared:
                shared_noise = torch.empty(len(shared), vocab_size, device=device)
                noise[shared] = shared_noise.exponential_(generator=self.generator)
            for j, generator in enumerate(generators):
                if generator is not None:
                    noise[j].exponential_(generator=generator)  # a contiguous [V] row
        # Exp(1) may round to 0; a zero would turn probability 0 into NaN or infinity.
        return noise.clamp_min_(torch.finfo(torch.float32).tiny)

    @staticmethod
    def with_logprobs(
        raw_logits: torch.Tensor, sampled: torch.Tensor, max_num_logprobs: int
    ) -> SamplerOutput:
        """`sampled` [S] with the logprobs of `raw_logits` [S, V] (none when
        max_num_logprobs < 0): the sampled token's and the top-K, K = min(max_num_logprobs, V)."""
        if max_num_logprobs < 0:
            return SamplerOutput(sampled, None, None, None)
        logprobs = torch.log_softmax(raw_logits.to(torch.float32), dim=-1)  # [S, V]
        sampled_logprobs = logprobs.gather(1, sampled.unsqueeze(1)).squeeze(1)  # [S]
        k = min(max_num_logprobs, raw_logits.shape[1])
        top_logprobs, top_ids = logprobs.topk(k, dim=-1, largest=True, sorted=True)  # [S, K]
        return SamplerOutput(sampled, sampled_logprobs, top_ids, top_logprobs)
