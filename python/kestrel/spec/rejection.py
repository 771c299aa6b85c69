"""The rejection sampler of speculative sampling, batched over rows.

Row i of a drafted request verifies draft d_i (or no draft: the bonus row after the last draft,
or a plain request's row) against the target distribution p_i, which is exactly what plain
sampling would draw that position from (`Sampler.target_probs`, with the row's penalties seeing
the drafts before it: `kestrel.spec.draft_rows`). With the proposer's distribution q_i:

  accept d_i with probability min(1, p_i(d_i) / q_i(d_i));
  on rejection draw from the residual max(0, p_i - q_i), normalized;
  a row without a draft draws from p_i.

Each row's result is one token t_i, and t_i == d_i exactly when d_i is accepted (a residual
draw never returns d_i: the residual is 0 there whenever a rejection can happen). The accepted
tokens of a request are then its drafts up to the first row with t_i != d_i, plus that row's
t_i (the correction, or the bonus after k accepted drafts): `kestrel.spec.greedy.verify_greedy`
on the rows' tokens. The output sequence follows the target distribution exactly (Leviathan et
al. 2023, Chen et al. 2023).

n-gram lookup (and any deterministic proposer) has a one-hot q: accept with probability
p_i(d_i), on rejection draw from p_i without d_i, renormalized. Drawing t_i ~ p_i and accepting
iff t_i == d_i has exactly that law, so for q = None a row is sampled as plain sampling samples
it (the exponential-race draw argmax(p / E), E ~ Exp(1)), consuming the same noise: with a
request's generator rewound to the state after its last accepted row, a seeded request makes
the same tokens with and without speculation. A draft-model proposer passes its q ([N, V]
probabilities; rows without a draft are ignored) and a uniform draw per row.
"""

from __future__ import annotations

import torch

NO_DRAFT = -1  # draft_token_ids of a row that verifies no draft


def rejection_sample(
    target_probs: torch.Tensor,
    draft_token_ids: torch.Tensor,
    noise: torch.Tensor,
    draft_probs: torch.Tensor | None = None,
    uniform: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tokens [N] int64, one per row (see the module docstring).

    target_probs [N, V] float32: p per row (rows sum to 1; a greedy row is one-hot);
    draft_token_ids [N] int64: d per row, NO_DRAFT for a row without one;
    noise [N, V] float32: Exp(1) draws (> 0) for the row's draw from p or from the residual;
    draft_probs [N, V] float32 or None: q per row, None = one-hot at d (n-gram lookup);
    uniform [N] float32 in [0, 1): the acceptance draw per row, needed with draft_probs.
    """
    num_rows, vocab_size = target_probs.shape
    if draft_token_ids.shape != (num_rows,) or noise.shape != target_probs.shape:
        raise ValueError(
            f"rejection_sample: target_probs {tuple(target_probs.shape)}, draft_token_ids "
            f"{tuple(draft_token_ids.shape)} and noise {tuple(noise.shape)} disagree; expected "
            f"[N, V], [N] and [N, V]"
        )
    bad = (draft_token_ids < NO_DRAFT) | (draft_token_ids >= vocab_size)
    if bool(bad.any()):
        raise ValueError(
            f"rejection_sample: draft token id {int(draft_token_ids[bad][0])} is outside "
            f"[0, {vocab_size - 1}] (or {NO_DRAFT} for no draft)"
        )
    if draft_probs is None:
        # One-hot q: the plain draw is an exact rejection sampler (accept iff it equals d).
        return (target_probs / noise).argmax(dim=-1)
    if draft_probs.shape != target_probs.shape or uniform is None or uniform.shape != (num_rows,):
        raise ValueError(
            "rejection_sample: draft_probs must be [N, V] like target_probs and come with a "
            f"uniform draw [N]; got draft_probs {tuple(draft_probs.shape)}, uniform "
            f"{None if uniform is None else tuple(uniform.shape)}"
        )
    has_draft = draft_token_ids != NO_DRAFT
    d = draft_token_ids.clamp_min(0).unsqueeze(1)  # [N, 1]
    p_d = target_probs.gather(1, d).squeeze(1)  # [N]
    q_d = draft_probs.gather(1, d).squeeze(1)  # [N]
    accepted = has_draft & (uniform * q_d < p_d)  # u < p / q, without dividing by q = 0
    residual = (target_probs - draft_probs).clamp_min_(0.0)  # [N, V]
    mass = residual.sum(dim=-1, keepdim=True)
    # Rows without a draft draw from p; so does a row whose residual is empty (p <= q
    # everywhere means p == q: it always accepts, the fallback only guards rounding).
    use_p = ~has_draft.unsqueeze(1) | (mass <= 0)
    source = torch.where(use_p, target_probs, residual / mass.clamp_min(1e-30))
    drawn = (source / noise).argmax(dim=-1)  # argmax(r / E): a draw from r (unnormalized ok)
    return torch.where(accepted, draft_token_ids, drawn)


def draw_noise(
    generators: list[torch.Generator | None],
    vocab_size: int,
    device: torch.device,
    shared: torch.Generator | None = None,
    with_uniform: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exp(1) noise [N, V] (and, with_uniform, U[0, 1) [N]) for rejection_sample: row j from
    generators[j], in row order, or from `shared` where that is None."""
    num_rows = len(generators)
    noise = torch.empty(num_rows, vocab_size, device=device)
    uniform = torch.empty(num_rows, device=device) if with_uniform else None
    for j, generator in enumerate(generators):
        g = generator if generator is not None else shared
        if uniform is not None:
            uniform[j : j + 1].uniform_(generator=g)
        noise[j].exponential_(generator=g)
    return noise.clamp_min_(torch.finfo(torch.float32).tiny), uniform
