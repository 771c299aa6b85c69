"""A fake target model over a tiny vocabulary and a decoding loop with and without speculation,
through the runner's real sampling pieces: InputBatch (draft-aware gather), Sampler, DraftRows,
GeneratorRewind and verify-style acceptance (drafts up to the first row whose token differs,
then that row's token)."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import torch

from kestrel.runner.input_batch import InputBatch
from kestrel.sample import Sampler, SamplingBatch
from kestrel.sampling_params import SamplingParams
from kestrel.spec.draft_rows import DraftRows
from kestrel.spec.rewind import GeneratorRewind

VOCAB = 8
EOS = 0
PROMPT = [1, 2, 3, 1, 2]
_table = torch.Generator().manual_seed(1234)
_LAST = torch.randn(VOCAB, VOCAB, generator=_table) * 1.5  # logits by the last token
_PREV = torch.randn(VOCAB, VOCAB, generator=_table) * 0.7  # plus a term of the one before


def fake_logits(context: list[int]) -> torch.Tensor:
    """[V] float32: the fake model's next-token logits after `context` (>= 2 tokens)."""
    return _LAST[context[-1]] + _PREV[context[-2]]


# Every processing step the drafts must see: penalties (repetition, frequency, presence),
# min_tokens (EOS banned for the first 2 outputs), logit bias, temperature and top-k / top-p.
PARAMS = SamplingParams(
    temperature=0.9,
    top_k=7,
    top_p=0.97,
    repetition_penalty=1.3,
    frequency_penalty=0.8,
    presence_penalty=0.3,
    min_tokens=2,
    logit_bias={3: 0.6},
    max_tokens=16,
)

Proposer = Callable[[list[int], np.random.Generator], list[int]]


def random_drafts(k: int) -> Proposer:
    """Drafts drawn from a fixed distribution by the proposer's own RNG (independent of the
    target's noise, as an n-gram lookup is): a one-hot q from the verifier's view."""
    weights = np.array([1, 3, 3, 4, 2, 2, 1, 1], dtype=np.float64)
    weights /= weights.sum()

    def propose(context: list[int], rng: np.random.Generator) -> list[int]:
        return rng.choice(VOCAB, size=k, p=weights).tolist()

    return propose


def decode(
    seed: int,
    num_tokens: int,
    proposer: Proposer | None,
    *,
    draft_aware: bool = True,
    rewind: bool = True,
    accept: Callable[[torch.Tensor, torch.Tensor, list[int]], torch.Tensor] | None = None,
    params: SamplingParams = PARAMS,
    device: str = "cpu",
) -> list[int]:
    """`num_tokens` output tokens of one seeded request on `device`. `proposer` None: plain
    decoding.
    `draft_aware=False` / `rewind=False` / `accept` (returns the rows' tokens from their
    target probs [K + 1, V] and sampled tokens) give deliberately wrong samplers."""
    batch_state = InputBatch(4, VOCAB, device)
    generator = torch.Generator(device=device).manual_seed(seed)
    slot = batch_state.add("s", params, PROMPT, generator, [EOS])
    sampler = Sampler(torch.Generator(device=device).manual_seed(seed + 10**6))
    rewinder = GeneratorRewind()
    rng = np.random.default_rng(seed)
    output: list[int] = []
    while len(output) < num_tokens:
        context = PROMPT + output
        drafts = proposer(context, rng) if proposer is not None else []
        rows = [context + drafts[:i] for i in range(len(drafts) + 1)]
        logits = torch.stack([fake_logits(r) for r in rows]).to(device)  # [K + 1, V]
        slots = [slot] * len(rows)
        draft_rows = DraftRows.from_runs(np.asarray(slots), np.asarray([context[-1], *drafts]))
        batch = batch_state.gather(slots, drafts=draft_rows if draft_aware else None)
        rewinder.start_step()
        out = sampler(logits, batch, record_states=True)
        rewinder.record(slots, batch.generators, out.generator_states)
        tokens = out.sampled_token_ids
        if accept is not None:
            tokens = accept(sampler.target_probs(logits, batch), tokens, drafts)
        accepted = []
        for i, token in enumerate(tokens.tolist()):
            accepted.append(token)
            if i == len(drafts) or token != drafts[i]:
                break
        for token in accepted:
            batch_state.append(slot, token)
            if rewind:
                rewinder.on_append([slot])
        output += accepted
    return output[:num_tokens]


def exact_distribution(num_tokens: int, params: SamplingParams = PARAMS) -> dict[tuple, float]:
    """Probability of every sequence of the first `num_tokens` outputs under plain sampling,
    each factor the sampler's own target distribution for that history."""
    sampler = Sampler()
    probs: dict[tuple, float] = {(): 1.0}
    for _ in range(num_tokens):
        nxt: dict[tuple, float] = {}
        prefixes = [p for p, w in probs.items() if w > 0]
        batch = SamplingBatch.build(
            [params] * len(prefixes),
            [PROMPT] * len(prefixes),
            [list(p) for p in prefixes],
            [None] * len(prefixes),
            VOCAB,
            "cpu",
            [[EOS]] * len(prefixes),
        )
        logits = torch.stack([fake_logits(PROMPT + list(p)) for p in prefixes])
        target = sampler.target_probs(logits, batch).double()
        for prefix, row in zip(prefixes, target):
            for t, pt in enumerate(row.tolist()):
                nxt[(*prefix, t)] = probs[prefix] * pt
        probs = nxt
    return probs


def chi_square_p_value(samples: list[tuple], expected: dict[tuple, float]) -> float:
    """Pearson's goodness-of-fit p-value of `samples` against `expected` probabilities; cells
    expecting fewer than 5 samples are pooled into one."""
    n = len(samples)
    counts: dict[tuple, int] = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    unexpected = [s for s in counts if expected.get(s, 0.0) == 0.0]
    if unexpected:
        return 0.0  # a sample the target distribution never makes
    big = [c for c, p in expected.items() if p * n >= 5]
    small = [c for c, p in expected.items() if 0 < p * n < 5]
    observed = [counts.get(c, 0) for c in big]
    wanted = [expected[c] * n for c in big]
    if small:
        observed.append(sum(counts.get(c, 0) for c in small))
        wanted.append(sum(expected[c] for c in small) * n)
    obs = torch.tensor(observed, dtype=torch.float64)
    exp = torch.tensor(wanted, dtype=torch.float64)
    stat = float(((obs - exp) ** 2 / exp).sum())
    dof = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(stat / 2.0)))


def all_sequences(num_tokens: int) -> list[tuple]:
    return list(itertools.product(range(VOCAB), repeat=num_tokens))
