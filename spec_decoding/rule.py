"""The acceptance rule of speculative sampling: why the output is exactly the target's.

Speculative decoding (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding"; Chen et al. 2023, "Accelerating Large Language Model Decoding with Speculative
Sampling") lets a cheap *drafter* guess the next tokens and the expensive *target* model check
all guesses in one forward pass.  This file holds the check itself, free of models and caches.

One speculative position.  The drafter proposed token ``x`` drawn from its distribution ``q``;
the target's distribution at the same position is ``p`` (both after temperature / top-k /
top-p, see :func:`probs_from_logits`).

1. Accept ``x`` with probability ``a(x) = min(1, p(x) / q(x))``.
2. If rejected, draw the token from the *residual* ``r = normalize(max(0, p - q))``.

Why this gives exactly ``p``: call ``beta = sum_x min(p(x), q(x))`` the overlap of ``p`` and
``q``.  The probability to emit ``y`` is

    P(y) = q(y) a(y) + (1 - beta) r(y)
         = min(q(y), p(y)) + (1 - beta) max(0, p(y) - q(y)) / (1 - beta)
         = min(q(y), p(y)) + max(0, p(y) - q(y))  =  p(y),

because the rejection probability ``sum_x q(x) (1 - a(x)) = 1 - beta`` is exactly the mass of
``max(0, p - q)``.  :func:`position_output_distribution` computes ``P`` from the same two
functions the decoder uses, so a test can check ``P == p`` for any ``p`` and ``q``.

Several positions.  After ``k`` accepted drafts the target has already computed the
distribution of the token after them, so one extra "bonus" token is drawn from it: a round
yields between 1 and ``k + 1`` tokens for one target pass, and each is distributed exactly as
if the target had sampled it alone.  Rejection at position ``i`` ends the round (everything the
drafter proposed after a wrong token is conditioned on the wrong prefix).

A point-mass drafter (prompt lookup: "the text repeats, so guess the tokens that followed
last time") is the special case ``q = onehot(x)``: accept with probability ``min(1, p(x)) =
p(x)``; the residual ``max(0, p - onehot(x))`` is ``p`` with ``x`` removed, so a rejection
samples from ``p(y) / (1 - p(x))`` over ``y != x``.  Check: ``P(x) = p(x)`` and, for ``y != x``,
``P(y) = (1 - p(x)) p(y) / (1 - p(x)) = p(y)``.  No draft probabilities are needed, only the
guess.

Greedy decoding (temperature 0) is the limit where ``p`` and ``q`` are one-hot at their argmax:
accept iff the draft token *is* the target's argmax, otherwise emit the target's argmax.
:func:`verify_greedy` does this with token comparisons only, so it is deterministic and uses no
random numbers.

Shapes: ``V`` = vocabulary size, ``k`` = number of drafted tokens.  Cost: ``O(k V)``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

# The settings object is the one every generation path uses; here it is applied identically to
# the target (``p``) and the drafter (``q``).  Re-exported: ``spec_decoding.SamplingSettings``.
from transformer.sampling import SamplingSettings, process_logits


def probs_from_logits(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """``(n, V)`` raw logits -> ``(n, V)`` float32 probabilities after temperature/top-k/top-p.

    Greedy settings give a one-hot row at ``logits.argmax`` (the token ``generate`` would pick).
    """
    if settings.greedy:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return torch.softmax(process_logits(logits, settings.temperature, settings.top_k, settings.top_p), dim=-1)


def acceptance_probability(p_x: torch.Tensor, q_x: torch.Tensor) -> torch.Tensor:
    """``min(1, p(x) / q(x))`` for the drafted tokens' probabilities (any matching shapes).

    ``q(x) > 0`` always holds for a token the drafter actually drew; ``q(x) = 0`` (never drawn)
    maps to 1 so the function is total.
    """
    ratio = torch.where(q_x > 0, p_x / q_x.clamp_min(torch.finfo(q_x.dtype).tiny), torch.ones_like(p_x))
    return ratio.clamp(max=1.0)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``normalize(max(0, p - q))`` over the last dim: where to sample after a rejection.

    ``(..., V)`` -> ``(..., V)``.  If ``p == q`` the residual has no mass, but then a rejection
    has probability 0 too; should rounding ever reject anyway, ``p`` itself is returned (the
    best answer, and what the exact rule would sample from in the limit).
    """
    r = (p - q).clamp_min(0.0)
    mass = r.sum(-1, keepdim=True)
    return torch.where(mass > 0, r / mass.clamp_min(torch.finfo(r.dtype).tiny), p)


def position_output_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The exact distribution of the token one speculative position emits (analytic).

    ``P(y) = sum_x q(x) [a(x) 1{y = x} + (1 - a(x)) r(y)]`` with ``a`` =
    :func:`acceptance_probability` and ``r`` = :func:`residual_distribution`, enumerating every
    draft token ``x``.  Equals ``p`` (the point of the rule).  ``(V,)`` -> ``(V,)``; ``O(V)``.
    """
    a = acceptance_probability(p, q)  # a[x] for every possible draft x
    reject_mass = (q * (1 - a)).sum()
    return q * a + reject_mass * residual_distribution(p, q)


def verify_sampled(target_probs: torch.Tensor, draft_probs: Optional[torch.Tensor], draft_tokens: torch.Tensor,
                   generator: Optional[torch.Generator] = None) -> Tuple[int, int]:
    """Run the rule over one round of ``k`` drafts; return ``(n_accepted, next_token)``.

    Args:
        target_probs: ``(k + 1, V)``; row ``i`` is ``p`` for draft ``i``, row ``k`` the bonus.
        draft_probs: ``(k, V)`` the ``q`` each draft was drawn from, or ``None`` for a
            point-mass drafter (``q = onehot(draft)``: prompt lookup).
        draft_tokens: ``(k,)`` the drafted tokens.
        generator: random source for the ``k`` uniforms and the final draw.

    The round emits ``draft_tokens[:n_accepted]`` followed by ``next_token`` (a residual draw
    after a rejection, or the bonus draw from ``target_probs[k]`` if all ``k`` were accepted).
    Cost: ``O(k V)`` plus one multinomial draw.
    """
    k, V = draft_tokens.shape[0], target_probs.shape[-1]
    if draft_probs is None:
        draft_probs = F.one_hot(draft_tokens, V).to(target_probs.dtype)
    n = k
    if k:
        rows = torch.arange(k, device=draft_tokens.device)
        a = acceptance_probability(target_probs[rows, draft_tokens], draft_probs[rows, draft_tokens])
        u = torch.rand(k, generator=generator, device=target_probs.device)
        rejected = (u >= a).nonzero()
        n = int(rejected[0]) if rejected.numel() else k
    dist = target_probs[k] if n == k else residual_distribution(target_probs[n], draft_probs[n])
    return n, int(torch.multinomial(dist, 1, generator=generator))


def verify_greedy(target_logits: torch.Tensor, draft_tokens: torch.Tensor) -> Tuple[int, int]:
    """Greedy verification: ``target_logits`` ``(k + 1, V)`` raw, ``draft_tokens`` ``(k,)``.

    Accepts the longest prefix of drafts that equal the target's argmax, then emits the
    target's argmax at the first mismatch (or the bonus position).  Returns ``(n_accepted,
    next_token)``; deterministic.
    """
    best = target_logits.argmax(-1)  # (k + 1,)
    k = draft_tokens.shape[0]
    mismatch = (draft_tokens != best[:k]).nonzero()
    n = int(mismatch[0]) if mismatch.numel() else k
    return n, int(best[n])
