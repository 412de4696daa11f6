"""Small building blocks shared by both models: norms, rotary embeddings, the MLP, masks."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import cpu_attention
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
    """The position-wise feed-forward network, standard or gated (``config.mlp``).

    * ``"standard"`` (GPT-2): ``fc_out(act(fc_in(x)))``, ``fc_in`` of width ``d_ff``.
    * ``"gated"`` (GLU; SwiGLU with ``silu``: Llama, Mistral, Qwen):
      ``fc_out(act(gate(x)) * up(x))``.  ``gate`` and ``up`` are fused into one ``fc_in`` of
      width ``2 * d_ff`` (columns ``[gate | up]``), so both come from one matrix product, as
      ``qkv_proj`` fuses the attention projections; Hugging Face's ``gate_proj``/``up_proj``/
      ``down_proj`` load into ``fc_in``'s two halves and ``fc_out``.

    Shape: ``(B, S, d_model)`` -> ``(B, S, d_model)``; hidden width ``config.d_ff``.
    Cost: ``4 * d_model * d_ff`` FLOPs per token, ``6 * d_model * d_ff`` gated.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gated = config.mlp == "gated"
        self.fc_in = Linear(config.d_model, (2 if self.gated else 1) * config.d_ff, bias=config.bias)
        self.fc_out = Linear(config.d_ff, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.activation = config.activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc_in(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = activate(gate, self.activation) * up
        else:
            h = activate(h, self.activation)
        return self.dropout(self.fc_out(h))


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """``config.activation`` applied to ``h`` (any shape; elementwise)."""
    if activation == "gelu":
        return F.gelu(h)
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if activation == "relu":
        return F.relu(h)
    return F.silu(h)


def rope_frequencies(head_dim: int, theta: float, scaling: Optional[dict] = None, device=None) -> torch.Tensor:
    """RoPE's ``head_dim / 2`` angular frequencies ``theta ** (-2i / head_dim)``, float32.

    Channel pair ``i`` turns by ``position * freq[i]`` radians: pair 0 once per token, the last
    pairs barely at all (wavelengths up to ``2 pi theta`` tokens).  ``scaling`` (a validated
    ``ModelConfig.rope_scaling``) stretches them for a longer context; ``"llama3"`` (Llama 3.1)
    divides the *low* frequencies by ``factor`` (wavelength longer than
    ``original_max_position_embeddings / low_freq_factor``: they never made a full turn in
    training, so slowing them keeps new positions inside angles seen in training), keeps the
    high ones (wavelength shorter than ``original / high_freq_factor``: local order), and blends
    linearly in between.  Same arithmetic as ``transformers``' ``_compute_llama3_parameters``.
    """
    freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    if scaling is None:
        return freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freq
    scaled = torch.where(wavelen > old_len / low, freq / factor, freq)
    smooth = (old_len / wavelen - low) / (high - low)  # 0 at the low edge, 1 at the high edge
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE, Su et al. 2021), "rotate-half" (GPT-NeoX) form.

    "Rotate-half" pairs channel ``i`` with channel ``i + head_dim/2`` (not ``2i`` with ``2i+1``
    as the RoPE paper and Meta's original Llama code do).  Hugging Face's Llama-family
    checkpoints are stored for this form (their conversion script permuted Meta's q/k rows), so
    they load without any permutation.

    RoPE encodes position by rotating each pair of query/key channels by an angle
    proportional to the position, so ``q_m . k_n`` depends only on ``m - n``.  Keys are cached
    *after* rotation: their position never changes, so the rotation is paid once.

    ``forward(position_ids (B, S))`` returns ``(cos, sin)`` of shape ``(B, S, 1, head_dim/2)``
    for :func:`apply_rotary`.  Angles are computed on the fly (one tiny outer product), so
    any position works, also beyond ``max_seq_len``.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: Optional[dict] = None):
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self.register_buffer("inv_freq", self._frequencies(), persistent=False)

    def _frequencies(self, device=None) -> torch.Tensor:
        return rope_frequencies(self.head_dim, self.theta, self.scaling, device)

    def reset_frequencies(self, device=None) -> None:
        """Recompute ``inv_freq`` (float32) on ``device``: after the model was built on the
        ``meta`` device and materialised with ``to_empty``, which leaves buffers uninitialised."""
        self.inv_freq = self._frequencies(device)

    def forward(self, position_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if inv_freq.dtype != torch.float32:
            # model.to(bfloat16) also casts this buffer; angles must stay float32 (bf16 holds
            # integers exactly only up to 256), so recompute the frequencies.
            inv_freq = self._frequencies(position_ids.device)
        angles = position_ids.float().unsqueeze(-1) * inv_freq  # (B, S, hd/2), float32
        return angles.cos().unsqueeze(2), angles.sin().unsqueeze(2)

    def table(self, n: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of positions ``0..n-1``, ``(n, head_dim/2)`` each, to index with
        positions known only as a tensor (a cache's positions inside it).  The last table is
        kept, so a stream whose cache is full computes it once.  Cost: ``O(n * head_dim)``."""
        key = n, torch.device(device), torch.is_inference_mode_enabled()
        if getattr(self, "_table", None) is None or self._table[0] != key:
            cos, sin = self(torch.arange(n, device=device)[None])
            self._table = key, (cos[0, :, 0], sin[0, :, 0])
        return self._table[1]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(B, S, H, head_dim)`` by the angles in ``cos``/``sin`` ``(B, S, 1, head_dim/2)``."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


def attention_mask(query_positions: torch.Tensor, key_positions: torch.Tensor,
                   key_padding_mask: Optional[torch.Tensor] = None, window: Optional[int] = None,
                   retention: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The one attention-mask builder: which key each query may see, from their positions.

    Causal attention, left padding, a sliding window and a cache that drops or reorders tokens
    are all the same question asked of positions: query at position ``q`` may see the key at
    position ``k`` iff ``k <= q`` (causal), ``q - k < window`` (sliding window), the key is not
    padding, and the cache's policy still held it when ``q`` came (``retention``).

    Args:
        query_positions: ``(S,)`` or ``(B, S)`` absolute positions of the new tokens.
        key_positions: ``(n,)``, ``(B, n)`` or ``(B, H, n)`` absolute positions of the keys
            attention reads, in the order it reads them (``cache.key_positions``: ring order
            for a window cache, per row and head for an importance cache).
        key_padding_mask: optional ``(B, > max position)``, 1/True for real tokens, indexed by
            position.
        window: optional sliding window.
        retention: optional boolean ``(..., S, n)`` from ``cache.retention_mask``, ANDed in.

    Returns boolean ``(B or 1, H or 1, S, n)``, ``True`` = may attend.  A query always sees
    itself, so a padding query never gets an all-masked row (softmax would give NaN).
    Cost: ``O(B * H * S * n)`` booleans (``H`` only for per-head key positions).
    """
    qp = _as_bhsn(query_positions.unsqueeze(-1))  # (B or 1, 1, S, 1)
    kp = _as_bhsn(key_positions.unsqueeze(-2))    # (B or 1, H or 1, 1, n)
    allowed = _visible(qp, kp, window)
    if retention is not None:
        allowed = allowed & _as_bhsn(retention)
    if key_padding_mask is not None:
        B = key_padding_mask.shape[0]
        rows = key_positions.expand(B, -1) if key_positions.dim() == 1 else key_positions  # (B, n) or (B, H, n)
        pad_ok = key_padding_mask.bool().gather(1, rows.reshape(B, -1)).view(rows.shape)
        allowed = (allowed & _as_bhsn(pad_ok.unsqueeze(-2))) | (kp == qp)
    return allowed


def _visible(qp: torch.Tensor, kp: torch.Tensor, window: Optional[int]) -> torch.Tensor:
    """The rule itself, on broadcastable positions: causal, and inside the window if any."""
    allowed = kp <= qp
    return allowed if window is None else allowed & (qp - kp < window)


class VarlenMask(NamedTuple):
    """The block-diagonal causal mask of sequences packed one after another, in the compressed
    form variable-length attention kernels take (FlashAttention's ``cu_seqlens``).

    ``cu_seq_q``/``cu_seq_k``: ``(n_seq + 1,)`` int32 cumulative query and key counts;
    ``max_q``/``max_k``: the longest of each (host ints).  Sequence ``i``'s queries are the last
    of its keys, and query ``j`` of it sees its keys up to its own position: exactly
    :func:`attention_mask` over the same positions with a same-sequence retention mask, without
    the ``S x N`` booleans, and the kernel skips every block outside the diagonal.
    """

    cu_seq_q: torch.Tensor
    cu_seq_k: torch.Tensor
    max_q: int
    max_k: int


class PagedMask(NamedTuple):
    """The mask of a step whose keys are a paged pool read in place, in the form the CPU
    paged-attention kernel takes (:func:`transformer.cpu_attention.paged_attention`): each query
    sees its own sequence's keys at positions up to its own (within ``window``), found through
    ``block_table``.  :func:`attention_mask`'s rule, stated per query instead of as ``S x N``
    booleans, so the kernel reads exactly those keys and no others.

    ``block_table``: ``(R, W)`` pool blocks of each sequence, ``-1`` after the last;
    ``query_positions``/``query_rows``: ``(B, S)`` each query's position and block-table row.
    """

    block_table: torch.Tensor
    block_size: int
    query_positions: torch.Tensor
    query_rows: Optional[torch.Tensor]
    window: Optional[int]


def varlen_available(device: torch.device) -> bool:
    """Can attention run :class:`VarlenMask` steps here: a CUDA device and a PyTorch with
    ``torch.nn.attention.varlen`` (FlashAttention's variable-length kernel, float16 and
    bfloat16 only: the mask builder asks for it only for those dtypes)."""
    import importlib.util

    return device.type == "cuda" and importlib.util.find_spec("torch.nn.attention.varlen") is not None


_Q_BLOCK = 128  # FlexAttention's query block: its GPU decoding kernel needs a multiple of 16 (a 1 was refused)


@torch.compiler.disable  # built eagerly, handed to a compiled model as inputs (see the note below)
def paged_block_mask(query_positions: torch.Tensor, block_table: torch.Tensor, block_size: int,
                     num_blocks: int, window: Optional[int] = None):
    """:func:`attention_mask`'s rule as a FlexAttention ``BlockMask`` over a paged pool, for
    attention that reads each row's blocks where they are.

    The keys are the whole pool, ``num_blocks * block_size`` slots; row ``b`` reads pool blocks
    ``block_table[b, :]`` (``(B, W)`` int32, ``-1`` after the row's last block), and its ``j``-th
    block holds its positions ``j * block_size ..``.  The block table *is* the block-sparse
    layout FlexAttention iterates over (``kv_indices``), so a row's attention touches only its
    own blocks; the ``mask_mod`` then applies the same rule as :func:`attention_mask` to the
    position each slot holds for that row (a slot of a block the row does not hold is never
    visible, so the rule is complete without the sparsity too).

    Args:
        query_positions: ``(B, S)`` positions of the new tokens.
        block_table, block_size, num_blocks: from the cache's ``key_blocks()``.
        window: optional sliding window.

    Cost: two ``(B, num_blocks)`` int32 tables built on the device (no host sync), so the
    mask can be built inside a CUDA graph.  Never traced by ``torch.compile``: a ``mask_mod``
    reading tensors computed inside the compiled graph gave wrong attention with torch 2.13's
    CPU kernels (measured, ``tests/test_engine.py``); built eagerly, its tables reach the
    compiled kernel as inputs, which is exact.
    """
    from torch.nn.attention.flex_attention import BlockMask

    B, W = block_table.shape
    dev = block_table.device
    held = block_table >= 0
    cols = torch.arange(W, dtype=torch.int32, device=dev).expand(B, W)
    # logical[b, p] = j if pool block p is row b's j-th block, else -1 (one extra column takes the padding)
    logical = torch.full((B, num_blocks + 1), -1, dtype=torch.int32, device=dev)
    logical.scatter_(1, torch.where(held, block_table, num_blocks).long(), cols)
    S = query_positions.shape[-1]
    n_q = -(-S // _Q_BLOCK)  # query blocks; each lists the same key blocks (its rule masks the rest)
    kv_indices = torch.zeros(B, 1, 1, num_blocks, dtype=torch.int32, device=dev)
    kv_indices[:, 0, 0, :W] = block_table.clamp(min=0)
    kv_indices = kv_indices.expand(B, 1, n_q, num_blocks)
    kv_num_blocks = held.sum(1, dtype=torch.int32).view(B, 1, 1).expand(B, 1, n_q)

    def mask_mod(b, h, q_idx, kv_idx):
        j = logical[b, kv_idx // block_size]
        kp = j * block_size + kv_idx % block_size
        return (j >= 0) & _visible(query_positions[b, q_idx], kp, window)

    return BlockMask.from_kv_blocks(kv_num_blocks, kv_indices, BLOCK_SIZE=(_Q_BLOCK, block_size),
                                    mask_mod=mask_mod, seq_lengths=(S, num_blocks * block_size),
                                    compute_q_blocks=False)


def _as_bhsn(t: torch.Tensor) -> torch.Tensor:
    """View a ``(S, n)``, ``(B, S, n)`` or ``(B, H, S, n)`` tensor as 4-D (missing dims of size 1)."""
    if t.dim() == 2:
        return t[None, None]
    return t[:, None] if t.dim() == 3 else t


def causal_mask(query_positions: torch.Tensor, kv_len: int,
                key_padding_mask: Optional[torch.Tensor] = None, window: Optional[int] = None) -> torch.Tensor:
    """:func:`attention_mask` over keys at positions ``0..kv_len-1`` (a cache that keeps every
    token in order, or no cache).  Returns ``(B or 1, 1, S, kv_len)``.  A shorthand for readers
    and tests; the model goes through :class:`MaskPlan`."""
    keys = torch.arange(kv_len, device=query_positions.device)
    return attention_mask(query_positions, keys, key_padding_mask, window)


class MaskPlan:
    """The attention mask of one forward pass, decided once by the model, built after each
    cache update from the positions the cache reports.

    ``is_causal``: no mask, use SDPA's built-in causal mask (its fastest kernel).  ``needed``:
    build one (:meth:`build`); neither: every key the cache returns is visible (``None``).
    See :func:`plan_mask` for the decision.  Building costs one :func:`attention_mask`; layers
    whose cache reports the *same* key-positions tensor (a lossless cache) share it.
    """

    def __init__(self, query_positions: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                 window: Optional[int], needed: bool, is_causal: bool = False):
        self.query_positions, self.key_padding_mask, self.window = query_positions, key_padding_mask, window
        self.needed, self.is_causal = needed, is_causal
        self._last = None  # (key positions, dtype, mask) of the last build, reused while the positions are the same tensor

    def build(self, cache, layer_idx: int, dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
        """The mask over the keys the last update of ``layer_idx`` returned (or, without a cache,
        over the new tokens themselves), ``(B or 1, H or 1, S, n)``; ``None`` if not needed.

        Boolean (``True`` = may attend), or with ``dtype`` additive: ``0`` where allowed,
        ``-inf`` elsewhere, the form ``scaled_dot_product_attention`` adds to the scores.  SDPA
        turns a boolean mask into that form on every call, so the attention layers ask for it
        once and share it (one conversion per forward instead of one per layer: measured ~7%
        of a CUDA-graphed GPT-2 decode step)."""
        if not self.needed:
            return None
        varlen = getattr(cache, "varlen", None)
        if (varlen is not None and self.window is None and self.key_padding_mask is None
                and dtype in (torch.float16, torch.bfloat16) and varlen_available(self.query_positions.device)):
            spec = varlen()  # packed sequences on a GPU: their mask in compressed form, for a varlen kernel
            if spec is not None:
                return VarlenMask(*spec)
        if hasattr(cache, "key_blocks"):  # attention reads a paged pool in place: one mask per step, all layers
            if self._last is None or self._last[0] is not cache or self._last[1] != dtype:
                self._last = cache, dtype, self._paged_mask(cache, dtype)
            return self._last[2]
        kp = self.query_positions if cache is None else cache.key_positions(layer_idx)
        if self._last is None or self._last[0] is not kp or self._last[1] != dtype:
            retention = None if cache is None else cache.retention_mask(self.query_positions, kp)
            allowed = attention_mask(self.query_positions, kp, self.key_padding_mask, self.window, retention)
            if dtype is not None:
                allowed = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
                    ~allowed, float("-inf"))
            self._last = kp, dtype, allowed
        return self._last[2]


    def _paged_mask(self, cache, dtype: Optional[torch.dtype]):
        """The mask of a step that reads a paged pool in place (``cache.key_blocks()``): on a
        CPU in float32, the C kernel's per-query rule (:class:`PagedMask`, its block table as
        int64 once for every layer); elsewhere a FlexAttention block mask.  A packed step
        (``query_rows``), which only the kernel reads, is refused elsewhere."""
        rows = getattr(cache, "query_rows", None)
        if (self.key_padding_mask is None and not torch.compiler.is_compiling()
                and cpu_attention.available(self.query_positions.device, dtype)):
            table, block_size, _ = cache.key_blocks()
            return PagedMask(table.long(), block_size, self.query_positions, rows, self.window)
        if rows is not None:
            raise ValueError("a packed in-place paged step (query_rows) needs the CPU paged-attention kernel: "
                             f"float32 on a CPU, eager, with a C compiler; got {dtype} on "
                             f"{self.query_positions.device} ({cpu_attention.why_not()})")
        return paged_block_mask(self.query_positions, *cache.key_blocks(), self.window)

def plan_mask(query_positions: torch.Tensor, past: Optional[int], cache=None,
              key_padding_mask: Optional[torch.Tensor] = None, window: Optional[int] = None) -> MaskPlan:
    """Decide, before any cache update and without a host sync, whether a forward needs a mask.

    ``S`` new tokens at ``query_positions``.  ``past``: how many positions precede them when
    they are appended (``past..past+S-1``), known on the host; ``None`` when the caller gave
    the positions as a tensor (``cache_position``: a fixed-shape step, a verify pass), which
    the host cannot read without a sync, so the mask is built from them.  With padding or a
    window some key lies outside of, a mask is built too.  Otherwise:

    * a fresh prompt (``past == 0``) that the cache keeps whole (it fits ``get_max_cache_shape``
      and ``retention_mask`` hides nothing) is plain causal attention: ``is_causal``;
    * one appended token sees every key a cache returns (the ``Cache`` contract): no mask.
    """
    S = query_positions.shape[-1]
    if past is None or key_padding_mask is not None or (window is not None and past + S > window):
        return MaskPlan(query_positions, key_padding_mask, window, needed=True)
    if past == 0 and (cache is None or _keeps_whole_prompt(cache, query_positions)):
        return MaskPlan(query_positions, None, window, needed=False, is_causal=True)
    return MaskPlan(query_positions, None, window, needed=S > 1)


def _keeps_whole_prompt(cache, positions: torch.Tensor) -> bool:
    """Would an empty ``cache`` hand back all of a prompt at ``positions`` ``0..S-1``, in order,
    with nothing hidden?  Asked of its capacity and its retention policy (data, not flags)."""
    capacity = cache.get_max_cache_shape()
    return (capacity is None or positions.shape[-1] <= capacity) and cache.retention_mask(positions, positions) is None


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
