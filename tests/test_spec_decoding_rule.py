"""The acceptance rule on plain probability vectors: one speculative position emits exactly ``p``.

``position_output_distribution`` enumerates every draft token ``x`` with the very functions the
decoder calls (``acceptance_probability``, ``residual_distribution``), so ``P == p`` here is a
proof about the code path, for dense, sparse, disjoint, identical and point-mass ``q``.  A
sampling test then checks that ``verify_sampled`` wires those functions together correctly.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from spec_decoding.rule import (SamplingSettings, acceptance_probability, position_output_distribution,
                                probs_from_logits, residual_distribution, verify_greedy, verify_sampled)


def _random_dist(g, V, support, dtype):
    """A random distribution over ``V`` tokens with ``support`` non-zero entries (peaked or flat)."""
    w = torch.rand(V, generator=g, dtype=torch.float64) ** (1 + 4 * torch.rand(1, generator=g, dtype=torch.float64))
    keep = torch.randperm(V, generator=g)[:support]
    mask = torch.zeros(V, dtype=torch.bool)
    mask[keep] = True
    w = torch.where(mask, w + 1e-3, torch.zeros_like(w))
    return (w / w.sum()).to(dtype)


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), V=st.integers(1, 40), data=st.data())
def test_one_position_emits_exactly_p(seed, V, data):
    sp = data.draw(st.integers(1, V))
    sq = data.draw(st.integers(1, V))
    g = torch.Generator().manual_seed(seed)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        p, q = _random_dist(g, V, sp, dtype), _random_dist(g, V, sq, dtype)
        out = position_output_distribution(p, q)
        assert torch.allclose(out, p, atol=tol, rtol=0), (p, q, out)


@pytest.mark.parametrize("case", ["identical", "disjoint", "q_point_mass", "p_point_mass", "q_covers_less",
                                  "q_covers_more"])
def test_special_supports(case):
    V = 12
    g = torch.Generator().manual_seed(1)
    p = _random_dist(g, V, V, torch.float64)
    if case == "identical":
        q = p.clone()
    elif case == "disjoint":
        p = torch.cat([_random_dist(g, 6, 6, torch.float64), torch.zeros(6, dtype=torch.float64)])
        q = torch.cat([torch.zeros(6, dtype=torch.float64), _random_dist(g, 6, 6, torch.float64)])
    elif case == "q_point_mass":  # prompt lookup: q = onehot(x)
        q = F.one_hot(torch.tensor(3), V).double()
    elif case == "p_point_mass":  # target greedy-like
        p, q = F.one_hot(torch.tensor(5), V).double(), p
    elif case == "q_covers_less":
        q = _random_dist(g, V, 3, torch.float64)
    else:
        p, q = _random_dist(g, V, 3, torch.float64), p
    assert torch.allclose(position_output_distribution(p, q), p, atol=1e-12, rtol=0)
    assert torch.allclose(position_output_distribution(p.float(), q.float()), p.float(), atol=1e-6, rtol=0)


def test_point_mass_rule_in_closed_form():
    """q = onehot(x): accept with probability p(x); the residual is p without x, renormalised."""
    p = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64)
    q = F.one_hot(torch.tensor(1), 3).double()
    assert float(acceptance_probability(p[1], q[1])) == pytest.approx(0.6)
    assert torch.allclose(residual_distribution(p, q), torch.tensor([0.25, 0.0, 0.75], dtype=torch.float64))


def test_acceptance_and_residual_basics():
    p = torch.tensor([0.5, 0.5, 0.0])
    q = torch.tensor([0.25, 0.25, 0.5])
    assert acceptance_probability(p, q).tolist() == [1.0, 1.0, 0.0]
    assert torch.allclose(residual_distribution(p, q), torch.tensor([0.5, 0.5, 0.0]))
    # p == q: no residual mass; the fallback is p itself (never reached by the exact rule)
    assert torch.equal(residual_distribution(p, p), p)
    # a token the drafter never draws (q = 0) maps to probability 1 instead of dividing by 0
    assert acceptance_probability(torch.tensor(0.3), torch.tensor(0.0)).item() == 1.0


def _chi2_critical(df, z=3.29):
    """Upper critical value of chi-square(df) at about 1 - 5e-4 (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_verify_sampled_first_token_follows_p():
    """Sampling through verify_sampled (k = 2 drafts drawn from q) gives p at the first position."""
    V, N = 6, 6000
    g = torch.Generator().manual_seed(0)
    p = torch.stack([_random_dist(g, V, s, torch.float32) for s in (4, 6, 6)])  # (k + 1, V)
    q = torch.stack([_random_dist(g, V, s, torch.float32) for s in (5, 3)])  # (k, V)
    counts = torch.zeros(V)
    accepted = 0
    for _ in range(N):
        drafts = torch.multinomial(q, 1, generator=g).squeeze(-1)
        n, token = verify_sampled(p, q, drafts, g)
        first = int(drafts[0]) if n >= 1 else token
        counts[first] += 1
        accepted += n
    expected = N * p[0].double()
    seen = expected > 0
    assert counts[~seen].sum() == 0  # never emits a token the target cannot produce
    chi2 = float(((counts[seen] - expected[seen]) ** 2 / expected[seen]).sum())
    assert chi2 < _chi2_critical(int(seen.sum()) - 1), chi2
    assert 0 < accepted < 2 * N  # both branches ran


def test_verify_sampled_all_accepted_draws_bonus_from_last_row():
    V = 5
    p = torch.full((3, V), 1 / V)
    p[2] = F.one_hot(torch.tensor(4), V).float()
    drafts = torch.tensor([1, 2])
    n, token = verify_sampled(p, p[:2].clone(), drafts, torch.Generator().manual_seed(0))  # p == q: accept all
    assert (n, token) == (2, 4)


def test_verify_sampled_point_mass_rejection_never_repeats_the_guess():
    p = torch.tensor([[0.0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]])
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        n, token = verify_sampled(p, None, torch.tensor([0]), g)  # p(0) = 0: always rejected
        assert n == 0 and token in (1, 2)


def test_verify_greedy():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])  # argmax 1, 0, 2
    assert verify_greedy(logits, torch.tensor([1, 0])) == (2, 2)  # all accepted: bonus
    assert verify_greedy(logits, torch.tensor([1, 2])) == (1, 0)  # second wrong: target's choice
    assert verify_greedy(logits, torch.tensor([2, 0])) == (0, 1)
    assert verify_greedy(logits[:1], torch.tensor([], dtype=torch.long)) == (0, 1)


def test_probs_from_logits_applies_the_sampling_settings():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert probs_from_logits(logits, SamplingSettings(0.0)).tolist() == [[0, 0, 0, 1]]
    probs = probs_from_logits(logits, SamplingSettings(1.0, top_k=2))
    assert probs[0, :2].sum() == 0 and torch.allclose(probs.sum(-1), torch.ones(1))
    with pytest.raises(ValueError, match="temperature"):
        SamplingSettings(-1.0)
