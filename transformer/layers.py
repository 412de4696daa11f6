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


class Linear(nn.Module):
    """``y = x @ weight + bias`` with ``weight`` stored as ``(in_features, out_features)``.

    ``torch.nn.Linear`` stores ``(out, in)`` and computes ``x @ weight.T``.  Both are the same
    maths, but decoding one token is a matrix-*vector* product bound by streaming the weights
    from memory, and on common CPU BLAS builds the ``(in, out)`` layout streams markedly faster
    (measured here with MKL: 106 vs 169 us for a 384 -> 1152 projection, ~1.3x on a whole decode
    step; ``benchmarks/decode_benchmark.py``).  GPT-2's ``Conv1D`` uses this layout too, so its
    weights load without a transpose.

    Shape: ``(..., in_features)`` -> ``(..., out_features)``.  Cost: ``2 * in * out`` FLOPs per row.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return x @ self.weight
        flat = torch.addmm(self.bias, x.reshape(-1, self.in_features), self.weight)
        return flat.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


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
        self.fc_in = Linear(config.d_model, config.d_ff, bias=config.bias)
        self.fc_out = Linear(config.d_ff, config.d_model, bias=config.bias)
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
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self._frequencies(), persistent=False)

    def _frequencies(self, device=None) -> torch.Tensor:
        return 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device)
                                     / self.head_dim))

    def forward(self, position_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if inv_freq.dtype != torch.float32:
            # model.to(bfloat16) also casts this buffer; angles must stay float32 (bf16 holds
            # integers exactly only up to 256), so recompute the frequencies.
            inv_freq = self._frequencies(position_ids.device)
        angles = position_ids.float().unsqueeze(-1) * inv_freq  # (B, S, hd/2), float32
        return angles.cos().unsqueeze(2), angles.sin().unsqueeze(2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(B, S, H, head_dim)`` by the angles in ``cos``/``sin`` ``(B, S, 1, head_dim/2)``."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


def causal_mask(query_positions: torch.Tensor, kv_len: int,
                key_padding_mask: Optional[torch.Tensor] = None, window: Optional[int] = None) -> torch.Tensor:
    """Boolean attention mask (``True`` = may attend) for causal attention over a cache.

    Args:
        query_positions: ``(S,)`` or ``(B, S)`` -- the cache slot of each query token.
        kv_len: number of key slots attention sees.
        key_padding_mask: optional ``(B, >=kv_len)``, 1/True for real tokens, 0 for padding.
        window: optional sliding window: key ``j`` must also satisfy ``position - j < window``.

    Returns ``(B or 1, 1, S, kv_len)``.  A query may see key ``j`` iff ``j <= position`` and
    key ``j`` is not padding.  A query always sees itself, so a padding query never has
    an all-masked row (which would turn softmax into NaN and poison the values it feeds).
    Cost: ``O(B * S * kv_len)`` booleans.
    """
    keys = torch.arange(kv_len, device=query_positions.device)
    qp = query_positions.unsqueeze(-1)  # (..., S, 1)
    allowed = keys <= qp  # (..., S, kv_len)
    if window is not None:
        allowed = allowed & (qp - keys < window)
    if key_padding_mask is not None:
        pad_ok = key_padding_mask[:, :kv_len].bool().unsqueeze(1)  # (B, 1, kv_len)
        allowed = (allowed & pad_ok) | (keys == qp)
    if allowed.dim() == 2:
        allowed = allowed.unsqueeze(0)
    return allowed.unsqueeze(1)


def key_position_mask(query_positions: torch.Tensor, key_positions: torch.Tensor,
                      key_padding_mask: Optional[torch.Tensor] = None, window: Optional[int] = None,
                      retention: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`causal_mask` for keys at arbitrary absolute positions (a cache that drops tokens).

    ``query_positions`` ``(S,)`` / ``(B, S)`` and ``key_positions`` ``(n,)`` / ``(B, n)`` are
    absolute slots; ``key_padding_mask`` ``(B, > max slot)`` is indexed by slot; ``retention``
    (``(..., S, n)``, from ``cache.retention_mask``) is ANDed in.  Returns boolean
    ``(B or 1, 1, S, n)``; a query always sees itself.  Cost: ``O(B * S * n)`` booleans.
    """
    qp, kp = query_positions.unsqueeze(-1), key_positions.unsqueeze(-2)  # (..., S, 1), (..., 1, n)
    allowed = kp <= qp
    if window is not None:
        allowed = allowed & (qp - kp < window)
    if retention is not None:
        allowed = allowed & retention
    if key_padding_mask is not None:
        B = key_padding_mask.shape[0]
        slots = key_positions.expand(B, key_positions.shape[-1])
        pad_ok = key_padding_mask.bool().gather(1, slots).unsqueeze(1)  # (B, 1, n)
        allowed = (allowed & pad_ok) | (kp == qp)
    if allowed.dim() == 2:
        allowed = allowed.unsqueeze(0)
    return allowed.unsqueeze(1)


class DeferredMask:
    """The mask of a cache that drops tokens, built only once that cache has said which keys it
    returned (``cache.key_positions`` after ``cache.update``).  ``Attention`` calls
    :meth:`build`; the arguments are those of :func:`key_position_mask`."""

    def __init__(self, query_positions: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                 window: Optional[int]):
        self.query_positions, self.key_padding_mask, self.window = query_positions, key_padding_mask, window

    def build(self, cache, layer_idx: int) -> torch.Tensor:
        """``(B or 1, 1, S, n)`` boolean mask over the keys the last update of ``layer_idx`` returned."""
        kp = cache.key_positions(layer_idx)
        return key_position_mask(self.query_positions, kp, self.key_padding_mask, self.window,
                                 cache.retention_mask(self.query_positions, kp))


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
