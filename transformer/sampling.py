"""Turning logits into the next token: greedy, temperature, top-k, top-p (nucleus).

The order is fixed and matches common practice (Hugging Face, vLLM):

1. **temperature** ``T``: ``logits / T``.  ``T < 1`` sharpens, ``T > 1`` flattens, ``T -> 0``
   approaches greedy (``T = 0`` *is* greedy here; any tiny ``T > 0`` works, see
   :func:`process_logits`).  ``T`` must be finite.
2. **top-k**: keep the ``k`` largest logits (exactly ``k``: ties are broken by index).
3. **top-p**: of what is left, keep the smallest set of most likely tokens whose probability
   mass reaches ``p`` (the most likely token is always kept).

Removed tokens get ``-inf`` so that ``softmax`` gives them probability 0 and the survivors
are renormalised.  All functions work on a batch: ``logits`` is ``(B, V)``.
Cost: top-k is ``O(V log k)``; top-p sorts, ``O(V log V)`` per row.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def validate_sampling_args(temperature: float = 1.0, top_k: Optional[int] = None,
                           top_p: Optional[float] = None) -> None:
    """Raise a ``ValueError`` naming the first invalid sampling parameter."""
    if (not isinstance(temperature, (int, float)) or isinstance(temperature, bool)
            or not math.isfinite(temperature) or temperature < 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or isinstance(top_p, bool)
                              or not 0.0 < top_p <= 1.0):  # also refuses nan (every comparison is False)
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the ``k`` largest logits per row, set the rest to ``-inf``. ``(B, V)`` -> ``(B, V)``."""
    if k >= logits.shape[-1]:
        return logits
    _, idx = torch.topk(logits, k, dim=-1)
    out = torch.full_like(logits, float("-inf"))
    return out.scatter(-1, idx, logits.gather(-1, idx))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest most-likely set whose probability reaches ``p``; ``-inf`` elsewhere.

    Sort descending, take the cumulative sum of probabilities; token ``i`` (in sorted order)
    is kept iff the mass of the tokens strictly before it is ``< p``.  So the first token is
    always kept, and we stop right after the mass reaches ``p``.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    remove_sorted = mass_before >= p
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def process_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                   top_p: Optional[float] = None) -> torch.Tensor:
    """Apply temperature, then top-k, then top-p to ``(B, V)`` logits (float32 result).

    ``temperature == 0`` is treated as greedy: only the argmax survives.  Below 1 the row
    maximum is subtracted before dividing (softmax is unchanged by a shift), so the scores are
    at most 0 and a tiny temperature cannot overflow to ``inf``: at ``1e-45`` every token below
    the maximum gets ``-inf`` and the maximum (or the tied maxima) keeps 0 -- the limit of
    ``T -> 0``, not a ``nan``.
    """
    logits = logits.float()
    if temperature == 0:
        return top_k_filter(logits, 1)
    if temperature < 1.0:
        top = logits.amax(dim=-1, keepdim=True)
        # (x - max) / T is <= 0; at the maximum it is 0 / T, which is nan if T rounds to 0 in float32
        logits = torch.where(logits == top, 0.0, (logits - top) / temperature)
    elif temperature != 1.0:
        logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return logits


def sample_next_token(logits: torch.Tensor, do_sample: bool = False, temperature: float = 1.0,
                      top_k: Optional[int] = None, top_p: Optional[float] = None,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pick one token per row from ``(B, V)`` logits; returns ``(B,)`` long.

    ``do_sample=False`` (or ``temperature == 0``) is greedy (argmax); otherwise draw from
    ``softmax(process_logits(...))`` with ``torch.multinomial`` and ``generator``.
    """
    if not do_sample or temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(process_logits(logits, temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
