"""SamplingBatch: the per-step, per-row sampling inputs as tensors.

Row i describes the i-th row of the logits given to the sampler (batch order). The runner gathers
one per step from its persistent, slot-indexed `kestrel.runner.InputBatch`; `SamplingBatch.build`
makes the same batch from per-row Python lists (the reference that InputBatch is tested against,
and the way to build one in tests). Everything that the host knows (which rows are greedy,
whether any row uses penalties, top-k/top-p/min-p, logit bias) is decided here on the host, so
the sampler never has to synchronize with the device to pick its path.

Penalty state is dense over the vocabulary and is built only when some row needs it:
  output_token_counts  [S, V] int32  how often each token occurs in the row's output so far
  prompt_token_mask    [S, V] bool   whether each token occurs in the row's prompt
Rows that do not use a penalty keep zeros there, and their neutral penalty values (1, 0, 0) leave
their logits bit-for-bit unchanged.

Sparse per-row edits are flat coordinate lists:
  logit_bias_rows/ids/values  [B]  logits[rows, ids] += values
  banned_rows/ids             [M]  logits[rows, ids] = -inf (min_tokens not yet reached)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kestrel.sampling_params import GREEDY_TEMPERATURE_EPS, SamplingParams

_FLOAT32_MAX = torch.finfo(torch.float32).max


@dataclass
class SamplingBatch:
    temperature: torch.Tensor  # [S] float32 (values of greedy rows are never used)
    top_p: torch.Tensor  # [S] float32, (0, 1]
    top_k: torch.Tensor  # [S] int32, 0 = disabled, else in [1, V] (a larger k is clamped to V)
    min_p: torch.Tensor  # [S] float32, [0, 1]
    repetition_penalty: torch.Tensor  # [S] float32, > 0
    presence_penalty: torch.Tensor  # [S] float32
    frequency_penalty: torch.Tensor  # [S] float32
    output_token_counts: torch.Tensor | None  # [S, V] int32; None when no row has a penalty
    prompt_token_mask: torch.Tensor | None  # [S, V] bool; None when no repetition penalty
    logit_bias_rows: torch.Tensor | None  # [B] int64; None when no row has a logit bias
    logit_bias_ids: torch.Tensor | None  # [B] int64
    logit_bias_values: torch.Tensor | None  # [B] float32
    banned_rows: torch.Tensor | None  # [M] int64; None when no row is under min_tokens
    banned_ids: torch.Tensor | None  # [M] int64
    random_rows: torch.Tensor | None  # [R] int64, rows that sample; None when all greedy
    random_row_ids: list[int]  # [R] the same rows on the host, ascending
    generators: list[torch.Generator | None]  # [S] per row; None = the shared generator
    vocab_size: int  # V, the last dim of the logits
    max_num_logprobs: int  # max over rows of params.logprobs; -1 when no row asks
    all_greedy: bool  # every row takes the argmax: no randomness is consumed
    use_repetition_penalty: bool  # some row has repetition_penalty != 1
    use_additive_penalties: bool  # some row has presence or frequency penalty != 0
    use_filters: bool  # some sampling row has top_k, top_p < 1 or min_p > 0

    @property
    def num_rows(self) -> int:
        return int(self.temperature.shape[0])

    @property
    def has_logit_edits(self) -> bool:
        """Whether any row's logits change before the argmax / sampling split."""
        return (
            self.logit_bias_rows is not None
            or self.banned_rows is not None
            or self.use_repetition_penalty
            or self.use_additive_penalties
        )

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int]],
        output_ids: Sequence[Sequence[int]],
        generators: Sequence[torch.Generator | None],
        vocab_size: int,
        device: torch.device | str,
        eos_token_ids: Sequence[Sequence[int]] | None = None,
    ) -> SamplingBatch:
        """Tensors for one step. All sequences are per row, in batch order.

        `eos_token_ids[i]` are the ids that end row i (masked while the row has fewer than
        `min_tokens` outputs, unless it sets `ignore_eos`); None means no EOS ids. Raises
        ValueError when lengths disagree or a user-given token id is outside [0, vocab_size).
        """
        num_rows = len(params)
        if eos_token_ids is None:
            eos_token_ids = [()] * num_rows
        for name, seq in (
            ("prompt_ids", prompt_ids),
            ("output_ids", output_ids),
            ("generators", generators),
            ("eos_token_ids", eos_token_ids),
        ):
            if len(seq) != num_rows:
                raise ValueError(f"{name} has {len(seq)} rows but params has {num_rows}")
        if vocab_size < 1:
            raise ValueError(f"vocab_size = {vocab_size} is invalid; allowed: an int >= 1")
        _check_user_token_ids(params, vocab_size)

        def floats(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        # Every per-row value fits its tensor's dtype for any value SamplingParams accepts:
        # top_k (unbounded int) is clamped to V, where it keeps every token as 0 does; the
        # unbounded floats (temperature, repetition_penalty) are clamped to the largest finite
        # float32, so they never become inf (inf * 0 or -inf / inf would be NaN). The others are
        # bounded ([0, 1], [-2, 2], [-100, 100]) or token ids checked against V; min_tokens and
        # max_tokens stay Python ints (only compared with output lengths here).
        greedy = [p.temperature < GREEDY_TEMPERATURE_EPS for p in params]
        random_row_ids = [i for i, g in enumerate(greedy) if not g]
        rep = [min(p.repetition_penalty, _FLOAT32_MAX) for p in params]
        pres = [p.presence_penalty for p in params]
        freq = [p.frequency_penalty for p in params]
        use_rep = any(r != 1.0 for r in rep)
        use_add = any(x != 0.0 for x in pres + freq)
        use_filters = any(
            params[i].top_k > 0 or params[i].top_p < 1.0 or params[i].min_p > 0.0
            for i in random_row_ids
        )

        counts = prompt_mask = None
        if use_rep or use_add:
            penalized = [i for i, p in enumerate(params) if _has_penalty(p)]
            counts = _token_counts(output_ids, penalized, num_rows, vocab_size, device)
            if use_rep:
                rep_rows = [i for i in penalized if params[i].repetition_penalty != 1.0]
                prompt_mask = _token_counts(prompt_ids, rep_rows, num_rows, vocab_size, device) > 0

        bias_rows, bias_ids, bias_values = [], [], []
        for i, p in enumerate(params):
            bias_rows.extend([i] * len(p.logit_bias))
            bias_ids.extend(p.logit_bias.keys())
            bias_values.extend(p.logit_bias.values())

        banned_rows, banned_ids = [], []
        for i, p in enumerate(params):
            if len(output_ids[i]) < p.min_tokens:
                stop_ids = set(p.stop_token_ids)
                if not p.ignore_eos:
                    stop_ids.update(eos_token_ids[i])
                banned_rows.extend([i] * len(stop_ids))
                banned_ids.extend(sorted(stop_ids))

        def longs(values: list[int]) -> torch.Tensor | None:
            return torch.tensor(values, dtype=torch.int64, device=device) if values else None

        logprobs = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            temperature=floats([min(p.temperature, _FLOAT32_MAX) for p in params]),
            top_p=floats([p.top_p for p in params]),
            top_k=torch.tensor(
                [min(max(p.top_k, 0), vocab_size) for p in params], dtype=torch.int32, device=device
            ),
            min_p=floats([p.min_p for p in params]),
            repetition_penalty=floats(rep),
            presence_penalty=floats(pres),
            frequency_penalty=floats(freq),
            output_token_counts=counts,
            prompt_token_mask=prompt_mask,
            logit_bias_rows=longs(bias_rows),
            logit_bias_ids=longs(bias_ids),
            logit_bias_values=floats(bias_values) if bias_values else None,
            banned_rows=longs(banned_rows),
            banned_ids=longs(banned_ids),
            random_rows=longs(random_row_ids),
            random_row_ids=random_row_ids,
            generators=list(generators),
            vocab_size=vocab_size,
            max_num_logprobs=max(logprobs, default=-1),
            all_greedy=not random_row_ids,
            use_repetition_penalty=use_rep,
            use_additive_penalties=use_add,
            use_filters=use_filters,
        )


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _check_user_token_ids(params: Sequence[SamplingParams], vocab_size: int) -> None:
    """Token ids that users typed must index the logits; raise ValueError otherwise."""
    for i, p in enumerate(params):
        for name, ids in (
            ("logit_bias", p.logit_bias.keys()),
            ("stop_token_ids", p.stop_token_ids),
        ):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(
                    f"row {i}: {name} has token id {bad[0]}; allowed: "
                    f"[0, {vocab_size - 1}] (vocab_size = {vocab_size})"
                )


def _token_counts(
    token_ids: Sequence[Sequence[int]],
    rows: list[int],
    num_rows: int,
    vocab_size: int,
    device: torch.device | str,
) -> torch.Tensor:
    """[num_rows, vocab_size] int32: occurrences of each id in token_ids[r] for r in rows.

    Rows not listed stay zero. One scatter for the whole batch; no per-token Python work
    beyond flattening the lists.
    """
    counts = torch.zeros(num_rows, vocab_size, dtype=torch.int32, device=device)
    lengths = [len(token_ids[r]) for r in rows]
    if sum(lengths) == 0:
        return counts
    flat_ids = torch.tensor(
        list(itertools.chain.from_iterable(token_ids[r] for r in rows)), dtype=torch.int64
    )
    if int(flat_ids.min()) < 0 or int(flat_ids.max()) >= vocab_size:
        raise ValueError(f"a prompt or output token id lies outside [0, {vocab_size - 1}]")
    flat_rows = torch.repeat_interleave(
        torch.tensor(rows, dtype=torch.int64), torch.tensor(lengths, dtype=torch.int64)
    )
    ones = torch.ones(flat_ids.shape[0], dtype=torch.int32, device=device)
    counts.index_put_((flat_rows.to(device), flat_ids.to(device)), ones, accumulate=True)
    return counts
