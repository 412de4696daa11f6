"""Sampling a whole engine step at once, on the device, each request from its own random stream.

A step's logits are ``(B, V)``, one row per request that is due a token.  Greedy rows take the
argmax.  Sampled rows are processed together with their own temperature, top-k and top-p
(:func:`~transformer.sampling.process_logits_rows`) and drawn by the **exponential race**: with
``E_v ~ Exp(1)`` independent, ``argmax_v p_v / E_v`` is a draw from ``p`` (the same
distribution as ``torch.multinomial``, and the way vLLM samples).  The noise row of a request is
a counter-based hash (:func:`~transformer.fast_decode.request_noise`) of *its* seed and of which
of its tokens is being drawn, so which tokens a request draws depends on its seed and its
position only -- never on its neighbours in the batch, on when it arrived, or on a preemption
(the redo draws its token at the same position with the same noise) -- and is the same on a CPU
and a GPU.  One kernel draws the noise of every sampled row.

Nothing here reads a value back to the host: the engine copies the ``(B,)`` tokens back
asynchronously and can schedule the next step meanwhile.  Cost: one argmax over ``B x V``;
for sampled rows one sort of their logits (only if some row uses top-k or top-p, and only of
each row's best candidates where those decide the filter), a few elementwise passes and the
noise (a hash per logit, one kernel for the step).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..fast_decode import fold_seed, request_noise
from ..sampling import process_logits_rows


def sample_step(logits: torch.Tensor, requests: Sequence) -> torch.Tensor:
    """Next token of each request, ``(B,)`` long on ``logits``' device, from ``(B, V)`` logits.

    ``requests[b]`` is the engine :class:`~transformer.engine.request.Request` of row ``b``:
    its ``params.settings`` say greedy or how to sample, its ``seed`` keys its random stream, and
    the token drawn is its output token number ``len(output_ids) + num_pending``."""
    tokens = logits.argmax(dim=-1)
    rows = [b for b, r in enumerate(requests) if not r.params.settings.greedy]
    if not rows:
        return tokens
    dev, V = logits.device, logits.shape[-1]
    drawn = [requests[b] for b in rows]
    settings = [r.params.settings for r in drawn]
    # every per-row number in one host table and one copy: (a host list turned into a device tensor
    # is a copy from pageable memory, which waits for the GPU and so undoes the engine's overlap)
    table = torch.tensor([rows, [s.temperature for s in settings],
                          [V if s.top_k is None else min(s.top_k, V) for s in settings],
                          [1.0 if s.top_p is None else s.top_p for s in settings],
                          [fold_seed(r.seed) for r in drawn],
                          [len(r.output_ids) + r.num_pending for r in drawn]], dtype=torch.float64)  # (6, S)
    if dev.type == "cuda":
        table = table.pin_memory().to(dev, non_blocking=True)
    index, seeds, counters = table[0].long(), table[4].long(), table[5].long()  # exact: all below 2^53
    # (a filter no row uses is left out: with neither, no sort of the step's logits at all)
    top_k = table[2].long() if any(s.top_k is not None and s.top_k < V for s in settings) else None
    top_p = table[3].float() if any(s.top_p is not None and s.top_p < 1 for s in settings) else None
    # sort only the best candidates where that is exact without a device read: every row has a
    # top-k, or (on a CPU, where reading back costs nothing) the top-p mass lies within 64
    ks = [s.top_k for s in settings if s.top_k is not None and s.top_k < V]
    width = max(ks) if len(ks) == len(settings) else max(ks + [64]) if dev.type == "cpu" else None
    temperature = None if all(s.temperature == 1 for s in settings) else table[1].float()  # None: 1 everywhere
    probs = torch.softmax(process_logits_rows(logits.index_select(0, index), temperature, top_k, top_p, width), dim=-1)
    exp1 = request_noise(seeds, counters, V).log_().neg_()  # Exp(1) draws, > 0: u < 1 strictly
    return tokens.index_copy(0, index, (probs / exp1).argmax(dim=-1))
