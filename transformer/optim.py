"""The optimiser and its learning-rate schedule: AdamW, linear warmup, cosine decay.

* :func:`configure_optimizer` -- AdamW with weight decay on matrices and embeddings only.
* :class:`WarmupCosine`, :func:`make_scheduler` -- the learning rate rises linearly for
  ``warmup_steps`` (large early steps on random weights are what makes training diverge),
  then falls along half a cosine to ``min_ratio * lr`` at ``max_steps``.

Both keep their state in plain numbers and tensors (``optimizer.state_dict()``,
``scheduler.state_dict()``), which ``train.py`` saves in ``last/`` for an exact ``--resume``.
Cost: AdamW keeps two float32 moments per parameter, twice the model's size in memory.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn


def configure_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                        betas: Tuple[float, float] = (0.9, 0.95), device: Optional[torch.device] = None):
    """AdamW with weight decay on weight matrices and embeddings only.

    Biases and norm gains (1-D parameters) are not decayed: shrinking them towards zero only
    hurts.  Tied weights are one parameter, so they appear once.  Uses the fused CUDA kernel
    when the parameters live on a GPU.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device is not None and device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


class WarmupCosine:
    """Learning-rate multiplier: linear warmup over ``warmup_steps``, then cosine decay to
    ``min_ratio`` at ``max_steps`` (and flat after).  A class rather than a lambda so the
    scheduler's state is plain numbers (checkpoints store no code)."""

    def __init__(self, warmup_steps: int, max_steps: int, min_ratio: float = 0.1):
        self.warmup_steps, self.max_steps, self.min_ratio = warmup_steps, max_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer, warmup_steps: int, max_steps: int, min_ratio: float = 0.1):
    """``LambdaLR`` driven by :class:`WarmupCosine`; call ``.step()`` once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps, max_steps, min_ratio))

