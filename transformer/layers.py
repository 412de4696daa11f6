"""Small building blocks shared by both models: norms, rotary embeddings, the MLP, masks."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm: ``x / rms(x) * weight`` (no mean subtraction, no bias).

    Shape: ``(..., d)`` -> ``(..., d)``.  Cost: one pass over ``x``.
    """

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(config: ModelConfig, d: Optional[int] = None) -> nn.Module:
    """The norm the config asks for (LayerNorm, with bias iff ``config.bias``, or RMSNorm)."""
    d = d or config.d_model
    if config.norm == "rmsnorm":
        return RMSNorm(d, config.norm_eps)
    return nn.LayerNorm(d, eps=config.norm_eps, bias=config.bias)


class MLP(nn.Module):
    """The position-wise feed-forward network: ``Linear -> activation -> Linear``.

    Shape: ``(B, S, d_model)`` -> ``(B, S, d_model)``; hidden width ``config.d_ff``.
    Cost: ``4 * d_model * d_ff`` FLOPs per token.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.fc_out = nn.Linear(config.d_ff, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.activation = config.activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc_in(x)
        if self.activation == "gelu":
            h = F.gelu(h)
        elif self.activation == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        elif self.activation == "relu":
            h = F.relu(h)
        else:
            h = F.silu(h)
        return self.dropout(self.fc_out(h))


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE, Su et al. 2021), "rotate-half" (GPT-NeoX) form.

    RoPE encodes position by rotating each pair of query/key channels by an angle
    proportional to the position, so ``q_m . k_n`` depends only on ``m - n``.  Keys are cached
    *after* rotation: their position never changes, so the rotation is paid once.

    ``forward(position_ids (B, S))`` returns ``(cos, sin)`` of shape ``(B, S, 1, head_dim/2)``
    for :func:`apply_rotary`.  Angles are computed on the fly (one tiny outer product), so
    any position works, also beyond ``max_seq_len``.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        angles = position_ids.to(self.inv_freq.dtype).unsqueeze(-1) * self.inv_freq  # (B, S, hd/2)
        return angles.cos().unsqueeze(2), angles.sin().unsqueeze(2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(B, S, H, head_dim)`` by the angles in ``cos``/``sin`` ``(B, S, 1, head_dim/2)``."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


def causal_mask(query_positions: torch.Tensor, kv_len: int,
                key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean attention mask (``True`` = may attend) for causal attention over a cache.

    Args:
        query_positions: ``(S,)`` or ``(B, S)`` -- the cache slot of each query token.
        kv_len: number of key slots attention sees.
        key_padding_mask: optional ``(B, >=kv_len)``, 1/True for real tokens, 0 for padding.

    Returns ``(B or 1, 1, S, kv_len)``.  A query may see key ``j`` iff ``j <= position`` and
    key ``j`` is not padding.  A query always sees itself, so a padding query never has
    an all-masked row (which would turn softmax into NaN and poison the values it feeds).
    Cost: ``O(B * S * kv_len)`` booleans.
    """
    keys = torch.arange(kv_len, device=query_positions.device)
    qp = query_positions.unsqueeze(-1)  # (..., S, 1)
    allowed = keys <= qp  # (..., S, kv_len)
    if key_padding_mask is not None:
        pad_ok = key_padding_mask[:, :kv_len].bool().unsqueeze(1)  # (B, 1, kv_len)
        allowed = (allowed & pad_ok) | (keys == qp)
    if allowed.dim() == 2:
        allowed = allowed.unsqueeze(0)
    return allowed.unsqueeze(1)


def init_weights(module: nn.Module, n_layers: int) -> None:
    """GPT-2 initialisation: N(0, 0.02) weights, zero biases, residual outputs scaled down.

    Output projections that add into the residual stream (``out_proj``, ``fc_out``) get std
    ``0.02 / sqrt(2 * n_layers)`` so the residual variance does not grow with depth.
    """
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("out_proj.weight", "fc_out.weight")) else 0.02
            nn.init.normal_(p, mean=0.0, std=std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
