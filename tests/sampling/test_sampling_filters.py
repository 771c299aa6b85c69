"""min_p / top_k / top_p: exact kept sets against an independent float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kestrel.sample import Sampler, SamplingBatch, apply_min_p_top_k_top_p
from kestrel.sampling_params import SamplingParams as P

V = 40


def reference_allowed(
    logits: np.ndarray, temperature: float, min_p: float, top_k: int, top_p: float
) -> set[int]:
    """Allowed token ids by the documented rules, in float64 with numpy."""
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    keep = probs >= min_p * probs.max()
    if top_k > 0:
        kth = np.sort(z[keep])[::-1][min(top_k, keep.sum()) - 1]
        keep &= z >= kth
    if top_p < 1.0:
        kept_ids = np.flatnonzero(keep)
        kept_probs = probs[kept_ids] / probs[kept_ids].sum()
        order = np.argsort(-kept_probs)
        cumulative = np.cumsum(kept_probs[order])
        size = int(np.searchsorted(cumulative, top_p)) + 1  # first prefix with mass >= top_p
        keep = np.zeros_like(keep)
        keep[kept_ids[order[:size]]] = True
    return set(np.flatnonzero(keep).tolist())


def midpoint_top_p(
    logits: np.ndarray, temperature: float, size: int, min_p: float = 0.0, top_k: int = 0
) -> float:
    """A top_p that keeps exactly `size` tokens after min_p and top_k, far from rounding."""
    ids = sorted(reference_allowed(logits, temperature, min_p, top_k, 1.0))
    z = logits.astype(np.float64)[ids] / temperature
    probs = np.sort(np.exp(z - z.max()))[::-1]
    cumulative = np.cumsum(probs / probs.sum())
    return float((cumulative[size - 2] + cumulative[size - 1]) / 2)


@pytest.fixture(scope="module")
def row_logits() -> np.ndarray:
    gen = torch.Generator().manual_seed(42)
    return (torch.randn(V, generator=gen) * 1.5).numpy()


def configs(row_logits: np.ndarray) -> list[dict]:
    return [
        {"temperature": 1.0, "top_k": 5},
        {"temperature": 0.7, "top_p": midpoint_top_p(row_logits, 0.7, 6)},
        {"temperature": 1.2, "min_p": 0.2},
        {
            "temperature": 0.9,
            "min_p": 0.01,
            "top_k": 12,
            "top_p": midpoint_top_p(row_logits, 0.9, 4, min_p=0.01, top_k=12),
        },
        {"temperature": 2.0, "top_k": 100, "top_p": 1.0, "min_p": 0.0},  # nothing filtered
    ]


def test_filter_keeps_exactly_the_reference_set(row_logits):
    cfgs = configs(row_logits)
    logits = torch.from_numpy(row_logits).expand(len(cfgs), V)
    temps = torch.tensor([c["temperature"] for c in cfgs]).unsqueeze(1)
    masked = apply_min_p_top_k_top_p(
        logits / temps,
        torch.tensor([c.get("min_p", 0.0) for c in cfgs]),
        torch.tensor([c.get("top_k", 0) for c in cfgs], dtype=torch.int32),
        torch.tensor([c.get("top_p", 1.0) for c in cfgs]),
    )
    sizes = []
    for row, cfg in enumerate(cfgs):
        expected = reference_allowed(
            row_logits,
            cfg["temperature"],
            cfg.get("min_p", 0.0),
            cfg.get("top_k", 0),
            cfg.get("top_p", 1.0),
        )
        kept = set(torch.isfinite(masked[row]).nonzero().flatten().tolist())
        assert kept == expected, (cfg, sorted(kept), sorted(expected))
        # Surviving logits are unchanged; only the sort was undone.
        finite = torch.isfinite(masked[row])
        assert torch.equal(masked[row][finite], (logits[row] / temps[row])[finite])
        sizes.append(len(kept))
    assert sizes[0] == 5 and sizes[1] == 6 and sizes[3] == 4 and sizes[4] == V
    assert 1 < sizes[2] < V  # min_p really removed something and kept more than one


def test_sampling_never_emits_excluded_tokens(row_logits):
    cfgs = configs(row_logits)[:4]
    per_cfg = 400
    params = [P(**c) for c in cfgs for _ in range(per_cfg)]
    batch = SamplingBatch.build(
        params, [[]] * len(params), [[]] * len(params), [None] * len(params), V, "cpu"
    )
    logits = torch.from_numpy(row_logits).expand(len(params), V)
    sampler = Sampler(torch.Generator().manual_seed(7))
    tokens = torch.cat([sampler(logits, batch).sampled_token_ids for _ in range(3)])
    tokens = tokens.view(3, len(cfgs), per_cfg).transpose(0, 1).reshape(len(cfgs), -1)
    for i, cfg in enumerate(cfgs):
        allowed = reference_allowed(
            row_logits,
            cfg["temperature"],
            cfg.get("min_p", 0.0),
            cfg.get("top_k", 0),
            cfg.get("top_p", 1.0),
        )
        seen = set(tokens[i].tolist())
        assert seen <= allowed, (cfg, sorted(seen - allowed))
        # Every allowed token with >= 1% renormalized mass shows up in 1200 fixed-seed draws.
        z = row_logits.astype(np.float64) / cfg["temperature"]
        probs = np.exp(z - z.max())
        ids = sorted(allowed)
        mass = probs[ids] / probs[ids].sum()
        assert {t for t, m in zip(ids, mass, strict=True) if m >= 0.01} <= seen


def test_tiny_top_p_keeps_only_the_top_token():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 1000, generator=gen) * 0.01  # nearly uniform: top mass ~ 1/1000
    top_p = torch.full((6,), 1e-9)
    masked = apply_min_p_top_k_top_p(
        logits, torch.zeros(6), torch.zeros(6, dtype=torch.int32), top_p
    )
    assert torch.isfinite(masked).sum(dim=-1).tolist() == [1] * 6
    assert torch.equal(masked.argmax(-1), logits.argmax(-1))
    batch = SamplingBatch.build(
        [P(top_p=1e-9, temperature=2.0)] * 6, [[]] * 6, [[]] * 6, [None] * 6, 1000, "cpu"
    )
    out = Sampler(torch.Generator().manual_seed(0))(logits, batch)
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))


def test_top_p_one_keeps_every_token_even_with_rounding():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(4, 5000, generator=gen) * 8  # many tiny tail probabilities
    masked = apply_min_p_top_k_top_p(
        logits, torch.zeros(4), torch.zeros(4, dtype=torch.int32), torch.ones(4)
    )
    assert torch.equal(masked, logits)
