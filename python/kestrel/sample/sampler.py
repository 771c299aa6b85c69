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
    # Row -> its own generator's state after the row's draw; only when asked (record_states).
    generator_states: dict[int, torch.Tensor] | None = None


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

    def __call__(
        self, logits: torch.Tensor, batch: SamplingBatch, *, record_states: bool = False
    ) -> SamplerOutput:
        """Sample one token per row of `logits` [S, V] (any float dtype; never modified).
        `record_states`: also return, for each row with its own generator, that generator's
        state right after the row's draw (`SamplerOutput.generator_states`; speculation rewinds
        a request's generator to the state after its last accepted row)."""
        processed = self._processed(logits, batch)
        sampled = processed.argmax(dim=-1)  # [S] int64; final for greedy rows
        states: dict[int, torch.Tensor] | None = {} if record_states else None
        if not batch.all_greedy:
            assert batch.random_rows is not None
            probs = self._random_row_probs(processed[batch.random_rows], batch)  # [R, V]
            generators = [batch.generators[i] for i in batch.random_row_ids]
            row_states: list[torch.Tensor | None] | None = [] if record_states else None
            noise = self._exponential_noise(generators, batch.vocab_size, logits.device, row_states)
            sampled.index_copy_(0, batch.random_rows, (probs / noise).argmax(dim=-1))
            if states is not None and row_states is not None:
                for row, state in zip(batch.random_row_ids, row_states):
                    if state is not None:
                        states[row] = state
        output = self.with_logprobs(logits, sampled, batch.max_num_logprobs)
        output.generator_states = states
        return output

    def target_probs(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """[S, V] float32: the distribution each row's token is drawn from (every step of the
        pipeline but the draw; a greedy row is one-hot at its argmax). The rejection sampler of
        a proposer with real draft probabilities verifies against it."""
        processed = self._processed(logits, batch)
        probs = torch.zeros_like(processed)
        probs.scatter_(1, processed.argmax(dim=-1, keepdim=True), 1.0)
        if not batch.all_greedy:
            assert batch.random_rows is not None
            random = self._random_row_probs(processed[batch.random_rows], batch)
            probs.index_copy_(0, batch.random_rows, random)
        return probs

    @staticmethod
    def _processed(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Step 1 (the logit edits) on a float32 copy, or `logits` itself when there are none."""
        expected = (batch.num_rows, batch.vocab_size)
        if logits.dim() != 2 or tuple(logits.shape) != expected:
            raise ValueError(
                f"logits shape {tuple(logits.shape)} does not match the batch; expected {expected}"
            )
        if batch.has_logit_edits:
            return apply_logits_processors(logits.to(torch.float32, copy=True), batch)
        return logits

    @staticmethod
    def _random_row_probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Steps 3-4 and the softmax: probs [R, V] of the non-greedy rows (`logits` [R, V])."""
        rows = batch.random_rows
        assert rows is not None
        scaled = logits.to(torch.float32) / batch.temperature[rows].unsqueeze(1)  # [R, V]
        if batch.use_filters:
            scaled = apply_min_p_top_k_top_p(
                scaled, batch.min_p[rows], batch.top_k[rows], batch.top_p[rows]
            )
        return torch.softmax(scaled, dim=-1)  # [R, V]; filtered tokens have probability 0

    def _exponential_noise(
        self,
        generators: list[torch.Generator | None],
        vocab_size: int,
        device: torch.device,
        states: list[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """[R, V] float32 Exp(1) noise; row j comes from generators[j] or the shared one.
        `states` (when given) gets, per row, its own generator's state after its draw (None
        for rows of the shared generator)."""
        num_rows = len(generators)
        shared = [j for j, g in enumerate(generators) if g is None]
        if len(shared) == num_rows:
            noise = torch.empty(num_rows, vocab_size, device=device)
            noise.exponential_(generator=self.generator)
            if states is not None:
                states.extend([None] * num_rows)
        else:
            noise = torch.empty(num_rows, vocab_size, device=device)
            if shared:
                shared_noise = torch.empty(len(shared), vocab_size, device=device)
                noise[shared] = shared_noise.exponential_(generator=self.generator)
            for j, generator in enumerate(generators):
                if generator is not None:
                    noise[j].exponential_(generator=generator)  # a contiguous [V] row
                if states is not None:
                    states.append(None if generator is None else generator.get_state())
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
