"""Sampling a whole engine step at once, on the device, each request from its own random stream.

A step's logits are ``(B, V)``, one row per request that is due a token.  Greedy rows take the
argmax.  Sampled rows are processed together with their own temperature, top-k and top-p
(:func:`~transformer.sampling.process_logits_rows`) and drawn by the **exponential race**: with
``E_v ~ Exp(1)`` independent, ``argmax_v p_v / E_v`` is a draw from ``p`` (the same
distribution as ``torch.multinomial``, and the way vLLM samples).  The noise row of a request
comes from *its* ``torch.Generator`` (seeded by ``seed``), so which tokens a request draws
depends on its seed and its step count only, never on its neighbours in the batch.

Nothing here reads a value back to the host: the engine copies the ``(B,)`` tokens back
asynchronously and can schedule the next step meanwhile.  Cost: one argmax over ``B x V``;
for sampled rows one sort of their logits (only if some row uses top-k or top-p), a few
elementwise passes and one noise kernel per request (its own generator).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..sampling import process_logits_rows


def sample_step(logits: torch.Tensor, requests: Sequence) -> torch.Tensor:
    """Next token of each request, ``(B,)`` long on ``logits``' device, from ``(B, V)`` logits.

    ``requests[b]`` is the engine :class:`~transformer.engine.request.Request` of row ``b``:
    its ``params.settings`` say greedy or how to sample, its ``generator`` is its random stream
    (``None``: torch's global one)."""
    tokens = logits.argmax(dim=-1)
    rows = [b for b, r in enumerate(requests) if not r.params.settings.greedy]
    if not rows:
        return tokens
    dev, V = logits.device, logits.shape[-1]
    settings = [requests[b].params.settings for b in rows]
    temperature = torch.tensor([s.temperature for s in settings], device=dev)
    # (a filter no row uses is left out: with neither, no sort of the step's logits at all)
    top_k = torch.tensor([V if s.top_k is None else min(s.top_k, V) for s in settings], device=dev) \
        if any(s.top_k is not None and s.top_k < V for s in settings) else None
    top_p = torch.tensor([1.0 if s.top_p is None else s.top_p for s in settings], device=dev) \
        if any(s.top_p is not None and s.top_p < 1 for s in settings) else None
    index = torch.tensor(rows, device=dev)
    probs = torch.softmax(process_logits_rows(logits.index_select(0, index), temperature, top_k, top_p), dim=-1)
    noise = torch.empty_like(probs)
    for i, b in enumerate(rows):  # each request's own stream: its draws never depend on the batch
        noise[i].exponential_(generator=requests[b].generator)
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)  # an exact 0 would divide p = 0 by 0
    return tokens.index_copy(0, index, (probs / noise).argmax(dim=-1))
