"""The common interface every KV cache in this package implements.

Why a cache at all?  A decoder produces token ``t`` by attending from token ``t`` to the keys
and values of tokens ``0..t``.  Keys and values of the old tokens never change (a causal model
cannot see the future), so recomputing them at every step is wasted work: an uncached step costs
``O(t)`` matrix products per layer, a cached step costs ``O(1)`` products plus one attention
read over ``t`` stored vectors.  A *KV cache* stores those vectors, one ``(keys, values)`` pair
per layer, and hands attention the full history each step.

The public names follow the cache API PyTorch users know from Hugging Face ``transformers``
(and from ``lucid.nn.cache``): ``update(key, value, layer_idx, cache_position) -> (keys,
values)``, ``get_seq_length``, ``reorder_cache``, ``batch_select_indices``,
``batch_repeat_interleave``, ``crop`` and ``reset``, plus ``rollback``.

Two ways to shorten a cache (they differ in which end they cut):

* ``crop(max_length)`` keeps the **most recent** ``max_length`` tokens of every layer (the meaning
  of ``lucid.nn.cache``: memory control).  The cache then no longer starts at position 0: it
  holds positions ``first .. first + max_length - 1``, says so through ``key_positions``, and
  ``get_seq_length`` keeps counting positions (it is the position of the next token, not the
  number of tokens held), so a model that continues after a crop puts its next token at the
  right position and masks with ``key_positions``.  A cropped cache reports ``is_lossless =
  False`` until ``reset()``.  Writing at a position before ``first`` is refused.
* ``rollback(max_length)`` keeps the **first** ``max_length`` positions (negative: drops that
  many from the end) -- the undo speculative decoding needs after rejected drafts (what Hugging
  Face calls ``crop``).  Rolling back below ``first`` is refused: those tokens are gone.

Layouts.  Tensors are ``(batch, heads, seq, head_dim)`` ("bhsd", the layout of
``torch.nn.functional.scaled_dot_product_attention``) or ``(batch, seq, heads, head_dim)``
("bshd", the FlashAttention layout).  A cache is built for one layout; ``update`` takes and
returns tensors in it.

``cache_position`` says where the new tokens go (``S`` = number of new tokens):

* ``None`` -- append after the last stored token;
* 0-D tensor -- one position (``S`` must be 1), the same for every batch row;
* 1-D tensor of ``S`` positions -- the same positions for every batch row;
* 2-D tensor ``(batch, S)`` -- positions per batch row.

After a write the layer's length is ``max(old length, largest position written + 1)``; slots
that were never written read as zeros.  Attention must therefore mask positions it should not
see (padding, holes), exactly as it masks the future.

This module knows nothing about models: it only stores and returns tensors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional, Sequence, Tuple, Union

import torch

from ..validate import layer_index, positive_int

Tensor = torch.Tensor
LAYOUTS = ("bhsd", "bshd")


def check_layout(layout: str) -> str:
    """Return ``layout`` if it is ``"bhsd"`` or ``"bshd"``, else raise a ``ValueError``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not supported; expected one of {LAYOUTS}")
    return layout


def seq_dim(layout: str) -> int:
    """The dimension that indexes tokens: 2 for ``"bhsd"``, 1 for ``"bshd"``."""
    return 2 if layout == "bhsd" else 1


def head_dim_of(layout: str) -> int:
    """The dimension that indexes heads: 1 for ``"bhsd"``, 2 for ``"bshd"``."""
    return 1 if layout == "bhsd" else 2


def check_kv_pair(key: Tensor, value: Tensor, layer_idx: int) -> None:
    """Check that ``key`` and ``value`` are 4-D tensors that agree in all but the last dim.

    Keys and values may have different head dims (some models do that) and different dtypes
    (mixed-precision caches), but they must agree on batch, heads and sequence length.
    """
    for name, t in (("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} for layer {layer_idx} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} for layer {layer_idx} must be 4-D (batch, heads, seq, head_dim) or "
                f"(batch, seq, heads, head_dim), got shape {tuple(t.shape)}"
            )
    if key.shape[:3] != value.shape[:3]:
        raise ValueError(
            f"key and value for layer {layer_idx} must agree on their first three dims, got "
            f"key {tuple(key.shape)} and value {tuple(value.shape)}"
        )
    if key.device != value.device:
        raise ValueError(f"key is on {key.device} but value is on {value.device} (layer {layer_idx})")


class WritePlan:
    """Where ``update`` writes ``S`` new tokens, decoded from ``cache_position``.

    Exactly one of ``start`` (contiguous append/overwrite at ``start..start+S-1`` for all rows),
    ``positions`` (1-D, shared by all rows) or ``row_positions`` (2-D, per row) is set.
    ``end`` is one past the largest position written (the new length if it grows).
    """

    __slots__ = ("start", "positions", "row_positions", "end")

    def __init__(self, start=None, positions=None, row_positions=None, end=0):
        self.start = start
        self.positions = positions
        self.row_positions = row_positions
        self.end = end


def plan_write(cache_position: Optional[Union[Tensor, int]], batch: int, seq: int, length: int) -> WritePlan:
    """Decode ``cache_position`` (see the module docstring) into a :class:`WritePlan`.

    ``length`` is the layer's current length (used for appends).  Positions must be
    non-negative; a 1-D tensor must have ``seq`` entries and a 2-D one shape ``(batch, seq)``.
    Cost: one device-to-host read of the largest position for tensor positions.
    """
    if cache_position is None:
        return WritePlan(start=length, end=length + seq)
    if isinstance(cache_position, int):
        cache_position = torch.tensor(cache_position)
    if not isinstance(cache_position, torch.Tensor):
        raise TypeError(f"cache_position must be None, an int or a tensor, got {type(cache_position).__name__}")
    if cache_position.is_floating_point():
        raise TypeError(f"cache_position must be an integer tensor, got dtype {cache_position.dtype}")
    pos = cache_position.long()
    if pos.dim() == 0:
        if seq != 1:
            raise ValueError(f"a 0-D cache_position writes one token, but {seq} new tokens were given")
        p = int(pos)
        if p < 0:
            raise ValueError(f"cache_position must be >= 0, got {p}")
        return WritePlan(start=p, end=p + 1)
    if pos.dim() == 1:
        if pos.numel() != seq:
            raise ValueError(f"1-D cache_position must have {seq} entries (one per new token), got {pos.numel()}")
        lo, hi = int(pos.min()), int(pos.max())
        if lo < 0:
            raise ValueError(f"cache_position must be >= 0, got minimum {lo}")
        if hi - lo + 1 == seq and torch.equal(pos, torch.arange(lo, lo + seq, device=pos.device)):
            return WritePlan(start=lo, end=hi + 1)  # contiguous: a plain slice copy
        if torch.unique(pos).numel() != seq:
            raise ValueError(f"cache_position has duplicate positions {pos.tolist()}; each new token needs its own slot")
        return WritePlan(positions=pos, end=hi + 1)
    if pos.dim() == 2:
        if tuple(pos.shape) != (batch, seq):
            raise ValueError(f"2-D cache_position must have shape (batch, seq)=({batch}, {seq}), got {tuple(pos.shape)}")
        lo, hi = int(pos.min()), int(pos.max())
        if lo < 0:
            raise ValueError(f"cache_position must be >= 0, got minimum {lo}")
        if seq > 1 and bool((pos.sort(dim=1).values.diff(dim=1) == 0).any()):
            raise ValueError("2-D cache_position has a duplicate position within a row; each new token needs its own slot")
        return WritePlan(row_positions=pos, end=hi + 1)
    raise ValueError(f"cache_position must be 0-D, 1-D or 2-D, got {pos.dim()}-D")


def write_into(buf: Tensor, new: Tensor, plan: WritePlan, layout: str) -> None:
    """Copy ``new`` into ``buf`` (same layout, ``buf`` long enough) at the planned positions.

    ``buf`` has batch size ``>= new.shape[0]``; rows ``[0, new.shape[0])`` are written.
    Cost: one copy of ``new`` (no copy of the old contents).
    """
    sd = seq_dim(layout)
    b, s = new.shape[0], new.shape[sd]
    if plan.start is not None:
        buf.narrow(0, 0, b).narrow(sd, plan.start, s).copy_(new)
    elif plan.positions is not None:
        buf.narrow(0, 0, b).index_copy_(sd, plan.positions.to(buf.device), new.to(buf.dtype))
    else:
        rows = torch.arange(b, device=buf.device).unsqueeze(1)  # (b, 1)
        pos = plan.row_positions.to(buf.device)  # (b, s)
        if layout == "bhsd":
            # buf[rows, :, pos] has shape (b, s, heads, head_dim): advanced indices go first.
            buf[rows, :, pos] = new.transpose(1, 2).to(buf.dtype)
        else:
            buf[rows, pos] = new.to(buf.dtype)


def check_append(cache_position: Optional[Union[Tensor, int]], start: int, seq: int, who: str) -> None:
    """For caches that can only append: ``cache_position`` must be ``None`` or ``start..start+seq-1``.

    Windowed and quantized caches forget or compress old slots, so they cannot overwrite one or
    leave a hole.  Raises a ``ValueError`` naming ``who`` and the positions expected.
    Cost: one small comparison (a host read) when a tensor is given.
    """
    if cache_position is None:
        return
    pos = torch.as_tensor(cache_position).long().reshape(-1)
    want = torch.arange(start, start + seq)
    if pos.numel() != seq or not torch.equal(pos.cpu(), want):
        raise ValueError(
            f"{who} only appends: cache_position must be None or positions {start}..{start + seq - 1} "
            f"(the next {seq} slot(s)), got {torch.as_tensor(cache_position).tolist()}")


def as_index(indices: Union[Tensor, Sequence[int]], name: str, batch: int, device) -> Tensor:
    """Turn ``indices`` into a 1-D long tensor on ``device``, checking ``0 <= i < batch``."""
    idx = torch.as_tensor(indices, dtype=torch.long)
    if idx.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(idx.shape)}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= batch):
        raise IndexError(f"{name} must be in [0, {batch}) for a cache of batch size {batch}, got {idx.tolist()}")
    return idx.to(device)


def select_rows(stores: Sequence[list], indices, batch: int) -> int:
    """Keep batch rows ``indices`` (in order) of every per-layer tensor in ``stores``.

    ``stores`` are parallel lists (one entry per layer, ``None`` for an unwritten layer; the first
    list says which layers are filled), e.g. ``(keys, values)``.  Returns the new batch size
    (``batch`` unchanged if no layer is filled).  Cost: one gather of everything stored.
    """
    idx = None
    for l, buf in enumerate(stores[0]):
        if buf is None:
            continue
        if idx is None:
            idx = as_index(indices, "indices", batch, buf.device)
        for store in stores:
            store[l] = store[l].index_select(0, idx)
    return batch if idx is None else idx.numel()


def repeat_rows(stores: Sequence[list], repeats: int, batch: Optional[int]) -> Optional[int]:
    """Repeat every batch row ``repeats`` times (rows ``b -> b * repeats``) in each per-layer
    tensor of ``stores`` (parallel lists as in :func:`select_rows`).  Returns the new batch size
    (``None`` stays ``None``: nothing stored).  Cost: a copy of everything stored, ``repeats``x."""
    positive_int("repeats", repeats)
    if batch is None:
        return None
    for l, buf in enumerate(stores[0]):
        if buf is not None:
            for store in stores:
                store[l] = store[l].repeat_interleave(repeats, dim=0)
    return batch * repeats


class Cache(ABC):
    """Abstract KV cache: per layer, the keys and values of every token seen so far.

    Subclasses decide *how* tensors are stored (grown on demand, preallocated, windowed,
    quantized...).  Every cache answers the same questions so that models and generation
    loops can be written once:

    ``update(key, value, layer_idx, cache_position=None) -> (keys, values)``
        Store the new tokens of one layer and return everything attention must use for it,
        ``(batch, kv_heads, length, head_dim)`` in "bhsd" layout.  Returned tensors may be
        views of internal storage: valid until the next call that modifies the cache.
    ``get(layer_idx)`` -> the stored ``(keys, values)`` of a layer, or ``None`` if empty.
    ``get_seq_length(layer_idx=0)`` -> number of token slots stored in that layer.
    ``get_max_cache_shape()`` -> capacity in tokens, or ``None`` if unbounded.
    ``reorder_cache(beam_idx)`` / ``batch_select_indices(indices)`` -> keep batch rows
        ``indices`` in that order (beam search reorders; serving drops finished rows).
    ``batch_repeat_interleave(repeats)`` -> each row repeated ``repeats`` times (beam expansion).
    ``crop(max_length)`` -> keep the most recent ``max_length`` tokens (memory control);
        ``key_positions`` then says which positions are held.
    ``rollback(max_length)`` -> keep the first ``max_length`` positions (negative: drop that
        many from the end).  This is the undo used by speculative decoding.
    ``reset()`` -> forget all tokens (and any crop offset).
    ``memory_bytes()`` -> bytes of tensor storage currently allocated.
    ``key_positions(layer_idx, in_cache=False)`` / ``retention_mask(q_pos, k_pos)`` -> for
        caches that drop tokens (``is_lossless=False``): which keys the last update returned,
        and which of them each new query may see (see "caches that drop tokens" below).
    """

    layout: str = "bhsd"
    #: True if this cache keeps every token it was given, exactly, at slot = position (so the
    #: returned length equals the number of tokens seen).  Caches that drop tokens (windows,
    #: sinks, importance-based eviction) or approximate them (quantization) set it to False and
    #: then describe what they returned through :meth:`key_positions` and :meth:`retention_mask`
    #: (see "Caches that drop tokens" below).
    is_lossless: bool = True
    #: StreamingLLM's positions (Xiao et al. 2023, section 3.3), for readers: True if the cache
    #: gives its keys the rotary distances of their positions inside the cache, through
    #: :meth:`rotary_offsets` (what models use; they test no flag).
    positions_in_cache: bool = False

    # ------------------------------------------------------------------ caches that drop tokens
    # A lossless cache returns keys 0..n-1 in order, so a model builds its causal mask from
    # ``arange(n)``.  A cache that drops tokens returns some subset, maybe in ring order, and the
    # model must learn which: it asks *after* ``update`` (the subset depends on the update).
    # Contract: ``update`` returns every stored key that at least one of the new queries may see
    # (plus the new ones), and after a one-token update every returned key is visible to that
    # token -- so a decoding step needs no mask at all.  And an empty cache given a prompt of at
    # most ``get_max_cache_shape()`` tokens, with ``retention_mask`` None, returns all of it in
    # order -- so the prompt is plain causal attention (a model may use SDPA's ``is_causal``).

    def key_positions(self, layer_idx: int, in_cache: bool = False) -> Tensor:
        """Positions of the keys the last ``update`` of ``layer_idx`` returned, in returned order.

        ``in_cache=False``: absolute positions (token slots, what ``cache_position`` counts) --
        the model builds its attention mask from them.  ``in_cache=True``: rank of each key
        among the returned keys, oldest 0 (StreamingLLM's positions, see
        :meth:`rotary_offsets`).  Shape ``(n,)`` shared by every batch row (a cache whose
        rows or heads keep different tokens may return ``(B, n)`` or ``(B, H, n)``).
        Default, for lossless caches: ``arange(n)`` for both.  Cost: ``O(n)`` integers.
        Every cache answers, lossless or not: a model builds every mask from it.
        """
        if not self.is_lossless:
            raise NotImplementedError(
                f"{type(self).__name__} drops or approximates tokens (is_lossless=False) but does not "
                f"implement key_positions(); a model cannot know which keys it returned")
        stored = self.get(layer_idx)
        n = 0 if stored is None else stored[0].shape[seq_dim(self.layout)]
        device = torch.device("cpu") if stored is None else stored[0].device
        return torch.arange(n, device=device)

    def retention_mask(self, query_positions: Tensor, key_positions: Tensor) -> Optional[Tensor]:
        """Which returned keys the cache's *policy* lets each new query see, or ``None`` (all).

        ``query_positions`` ``(S,)`` or ``(B, S)`` and ``key_positions`` ``(n,)`` or ``(B, n)``
        are absolute positions; the result is boolean ``(..., S, n)``, True where the cache, had
        it processed the queries one at a time, would still hold the key when the query comes.
        A model ANDs it with its causal / padding / sliding-window mask, which makes a
        multi-token update (a long prompt) attend exactly as token-by-token decoding would.
        Default ``None``: no restriction beyond causality.
        """
        return None

    def _arange_positions(self, first: int, n: int, device) -> Tensor:
        """``arange(first, first + n)``, the same tensor on every call with the same arguments:
        every layer of a cache that holds the same positions answers ``key_positions`` with one
        tensor, so a model builds one mask per forward, not one per layer.  Shared: read-only."""
        memo = getattr(self, "_positions_memo", None)
        if memo is None or memo[0] != (first, n) or memo[1].device != torch.device(device):
            memo = self._positions_memo = (first, n), torch.arange(first, first + n, device=device)
        return memo[1]

    def rotary_offsets(self, layer_idx: int) -> Optional[Tensor]:
        """Rotations the keys returned by the last update of ``layer_idx`` still owe, or ``None``.

        ``None`` (the usual case): keys are rotated at their position *before* ``update`` and
        stored rotated -- a key's position never changes, so its rotation is paid once.  A cache
        whose kept keys move (StreamingLLM's positions inside the cache) answers ``offsets``
        ``(m,)``: the first ``m`` returned keys are scratch copies that the model rotates in
        place by ``offsets`` more positions (a key rotated at ``j`` becomes one rotated at ``j +
        offset``).  ``m`` is small (the sinks), so this is ``O(m)`` per layer and step.
        """
        return None

    @abstractmethod
    def update(self, key: Tensor, value: Tensor, layer_idx: int,
               cache_position: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Store ``key``/``value`` for ``layer_idx`` and return the layer's full keys/values."""

    @abstractmethod
    def get(self, layer_idx: int) -> Optional[Tuple[Tensor, Tensor]]:
        """Return the stored ``(keys, values)`` of ``layer_idx``, or ``None`` if it is empty."""

    @abstractmethod
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of token slots stored for ``layer_idx`` (0 when empty)."""

    def get_max_cache_shape(self) -> Optional[int]:
        """Maximum number of tokens per layer, or ``None`` when the cache can grow without bound."""
        return None

    @abstractmethod
    def batch_select_indices(self, indices: Union[Tensor, Sequence[int]]) -> None:
        """Keep only batch rows ``indices`` (in that order) in every layer."""

    def reorder_cache(self, beam_idx: Union[Tensor, Sequence[int]]) -> None:
        """Reorder batch rows for beam search: row ``i`` becomes old row ``beam_idx[i]``."""
        self.batch_select_indices(beam_idx)

    @abstractmethod
    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times in place (``B -> B * repeats``)."""

    @abstractmethod
    def crop(self, max_length: int) -> None:
        """Keep only the most recent ``max_length`` tokens of every layer (``max_length >= 0``).

        Positions do not move: ``get_seq_length`` stays the position of the next token and
        ``key_positions`` names the positions still held.  Caches that cannot do it raise.
        """

    @abstractmethod
    def rollback(self, max_length: int) -> None:
        """Keep the first ``max_length`` positions of every layer; negative drops from the end."""

    @abstractmethod
    def reset(self) -> None:
        """Forget every stored token (storage may be kept for reuse)."""

    @abstractmethod
    def memory_bytes(self) -> int:
        """Bytes of tensor storage this cache currently holds (allocated, not just used)."""

    # ------------------------------------------------------------------ helpers
    def __len__(self) -> int:
        return self.get_seq_length(0)

    @staticmethod
    def _rollback_target(max_length: int, length: int) -> int:
        """Translate ``rollback``'s argument into the length to keep (clamped to ``[0, length]``)."""
        if isinstance(max_length, bool) or not isinstance(max_length, int):
            raise TypeError(f"rollback(max_length) takes an int, got {type(max_length).__name__}")
        keep = length + max_length if max_length < 0 else max_length
        return max(0, min(keep, length))

    @staticmethod
    def _crop_count(max_length: int) -> int:
        """Check ``crop``'s argument: the number of most recent tokens to keep, an int ``>= 0``."""
        if isinstance(max_length, bool) or not isinstance(max_length, int):
            raise TypeError(f"crop(max_length) takes an int, got {type(max_length).__name__}")
        if max_length < 0:
            raise ValueError(f"crop(max_length) keeps the most recent max_length tokens, so max_length must be "
                             f">= 0, got {max_length}; to drop tokens from the end use rollback({max_length})")
        return max_length


class BufferedCache(Cache):
    """Shared machinery for caches that keep each layer in one preallocated-or-grown buffer.

    Per layer it holds ``keys[l]`` and ``values[l]`` with a sequence *capacity* that may exceed
    the number of tokens stored (``_lengths[l]``); ``update`` writes into the spare room and
    returns a view ``buffer[..., :length, ...]``, so appending one token copies one token.
    Subclasses decide how capacity is obtained (:meth:`_ensure_capacity`).

    Slots and positions.  Slot ``i`` of layer ``l`` holds position ``_offsets[l] + i``.  The
    offset is 0 until :meth:`crop` drops the oldest tokens: the kept ones then move to slot 0
    (so the freed room is reused by later writes) and the offset grows by the number dropped.
    ``cache_position`` and ``get_seq_length`` always speak in positions.
    """

    def __init__(self, layout: str = "bhsd"):
        self.layout = check_layout(layout)
        self._sd = seq_dim(layout)
        self.keys: list = []  # per layer buffer or None
        self.values: list = []
        self._lengths: list = []  # slots in use per layer
        self._offsets: list = []  # position held by slot 0, per layer (> 0 only after crop)
        self._batch: Optional[int] = None  # rows in use

    # -------------------------------------------------------------- storage hooks
    @abstractmethod
    def _ensure_capacity(self, layer_idx: int, key: Tensor, value: Tensor, needed: int) -> None:
        """Make ``keys[layer_idx]`` / ``values[layer_idx]`` hold at least ``needed`` tokens."""

    def _capacity(self, layer_idx: int) -> int:
        buf = self.keys[layer_idx]
        return 0 if buf is None else buf.shape[self._sd]

    def _grow_lists(self, layer_idx: int) -> None:
        layer_index(layer_idx)
        while len(self.keys) <= layer_idx:
            self.keys.append(None)
            self.values.append(None)
            self._lengths.append(0)
            self._offsets.append(0)

    def _view(self, layer_idx: int) -> Tuple[Tensor, Tensor]:
        n, b = self._lengths[layer_idx], self._batch
        k = self.keys[layer_idx].narrow(0, 0, b).narrow(self._sd, 0, n)
        v = self.values[layer_idx].narrow(0, 0, b).narrow(self._sd, 0, n)
        return k, v

    # -------------------------------------------------------------- Cache API
    def update(self, key, value, layer_idx, cache_position=None):
        """Write ``key``/``value`` at ``cache_position`` (see module docstring); return all.

        Shapes: ``key`` ``(B, H_kv, S, D_k)`` ("bhsd") or ``(B, S, H_kv, D_k)`` ("bshd"); the
        result has the same layout with ``S`` replaced by the layer's length.
        Cost: a copy of the ``S`` new tokens, plus an occasional capacity change.
        """
        check_kv_pair(key, value, layer_idx)
        self._grow_lists(layer_idx)
        batch, seq = key.shape[0], key.shape[self._sd]
        if self._batch is not None and batch != self._batch and any(n for n in self._lengths):
            raise ValueError(
                f"key for layer {layer_idx} has batch size {batch}, but the cache holds {self._batch} rows; "
                f"use batch_select_indices / batch_repeat_interleave to change the batch, or reset()"
            )
        self._check_compatible(layer_idx, key, value)
        if self._offsets[layer_idx] and cache_position is not None:
            cache_position = self._positions_to_slots(cache_position, layer_idx)
        plan = plan_write(cache_position, batch, seq, self._lengths[layer_idx])
        self._ensure_capacity(layer_idx, key, value, plan.end)
        self._batch = batch
        n = self._lengths[layer_idx]
        if plan.end > n and (plan.start is None or plan.start > n):
            # A write that leaves a hole past the old end: clear stale slots (left by crop)
            # so that never-written positions read as zeros.
            for buf in (self.keys[layer_idx], self.values[layer_idx]):
                buf.narrow(0, 0, batch).narrow(self._sd, n, plan.end - n).zero_()
        write_into(self.keys[layer_idx], key, plan, self.layout)
        write_into(self.values[layer_idx], value, plan, self.layout)
        self._lengths[layer_idx] = max(self._lengths[layer_idx], plan.end)
        return self._view(layer_idx)

    def _positions_to_slots(self, cache_position, layer_idx: int) -> Tensor:
        """``cache_position`` (positions) minus the layer's crop offset (slots); refuses positions
        that crop already dropped.  Cost: one host read of the smallest position."""
        off = self._offsets[layer_idx]
        pos = torch.as_tensor(cache_position)
        if pos.is_floating_point():
            raise TypeError(f"cache_position must be an integer tensor, got dtype {pos.dtype}")
        pos = pos.long()
        if pos.numel() and int(pos.min()) < off:
            raise ValueError(
                f"cache_position={pos.tolist()} writes before position {off} of layer {layer_idx}, but crop() "
                f"dropped positions 0..{off - 1}: expected positions >= {off} (or reset() to start again)")
        return pos - off

    def first_position(self, layer_idx: int = 0) -> int:
        """Position of the oldest token ``layer_idx`` still holds: 0 unless :meth:`crop` dropped some."""
        return self._offsets[layer_idx] if layer_idx < len(self._offsets) else 0

    def key_positions(self, layer_idx: int, in_cache: bool = False) -> Tensor:
        """Positions ``(n,)`` of the ``n`` stored keys of ``layer_idx``, oldest first.

        ``in_cache=False``: absolute positions, ``first_position + arange(n)`` (``arange(n)``
        until a crop).  ``in_cache=True``: ``arange(n)``.  Cost: ``O(n)`` integers, once for
        all layers holding the same positions (the tensor is shared: read it, do not write it).
        """
        n = self._lengths[layer_idx] if layer_idx < len(self._lengths) else 0
        first = 0 if in_cache else self.first_position(layer_idx)
        return self._arange_positions(first, n, self._device())

    def _check_compatible(self, layer_idx: int, key: Tensor, value: Tensor) -> None:
        """Check heads / head dims / dtype / device against what the layer already stores."""
        buf_k, buf_v = self.keys[layer_idx], self.values[layer_idx]
        if buf_k is None:
            return
        hd = head_dim_of(self.layout)
        for name, new, buf in (("key", key, buf_k), ("value", value, buf_v)):
            if new.shape[hd] != buf.shape[hd] or new.shape[3] != buf.shape[3]:
                raise ValueError(
                    f"{name} for layer {layer_idx} has {new.shape[hd]} heads of dim {new.shape[3]}, "
                    f"expected {buf.shape[hd]} heads of dim {buf.shape[3]} ({self.layout} layout)"
                )
            if new.device != buf.device:
                raise ValueError(f"{name} for layer {layer_idx} is on {new.device}, expected {buf.device}")

    def get(self, layer_idx):
        """Return the ``(keys, values)`` views of ``layer_idx`` or ``None`` if nothing is stored."""
        if layer_idx >= len(self.keys) or self.keys[layer_idx] is None or self._lengths[layer_idx] == 0:
            return None
        return self._view(layer_idx)

    def get_seq_length(self, layer_idx=0):
        """Position of the next token of ``layer_idx``: the tokens stored, plus those :meth:`crop`
        dropped from the front (0 if the layer was never written)."""
        if layer_idx >= len(self._lengths):
            return 0
        return self._offsets[layer_idx] + self._lengths[layer_idx]

    @property
    def batch_size(self) -> Optional[int]:
        """Rows currently stored (``None`` before the first update)."""
        return self._batch

    def batch_select_indices(self, indices):
        """Keep rows ``indices`` (in order): ``keys[l] = keys[l][indices]`` for every layer. O(cache)."""
        if self._batch is None:
            return
        idx = as_index(indices, "indices", self._batch, self._device())
        self._rebatch(lambda t: t.index_select(0, idx), idx.numel())

    def batch_repeat_interleave(self, repeats):
        """Repeat each row ``repeats`` times (rows ``b`` -> ``b*repeats``). O(cache * repeats)."""
        positive_int("repeats", repeats)
        if self._batch is None:
            return
        self._rebatch(lambda t: t.repeat_interleave(repeats, dim=0), self._batch * repeats)

    def _device(self):
        for k in self.keys:
            if k is not None:
                return k.device
        return torch.device("cpu")

    @abstractmethod
    def _rebatch(self, fn, new_batch: int) -> None:
        """Apply ``fn`` (a batch-dim gather) to every layer's used rows, ending with ``new_batch`` rows."""

    def crop(self, max_length):
        """Keep only the most recent ``max_length`` tokens of every layer (``max_length >= 0``).

        The kept tokens move to the front of the buffer (capacity is kept, so later writes reuse
        the room) and the layer's :meth:`first_position` grows by the number dropped;
        ``get_seq_length`` does not change.  Once something was dropped the cache reports
        ``is_lossless = False`` (until :meth:`reset`), so a model masks it by
        :meth:`key_positions`.  Cost: one copy of the ``max_length`` kept tokens per layer.
        """
        keep = self._crop_count(max_length)
        for l, n in enumerate(self._lengths):
            drop = n - keep
            if drop <= 0:
                continue
            if keep:
                for buf in (self.keys[l], self.values[l]):
                    rows = buf.narrow(0, 0, self._batch)
                    src = rows.narrow(self._sd, drop, keep)
                    rows.narrow(self._sd, 0, keep).copy_(src.clone() if drop < keep else src)  # overlap-safe
            self._offsets[l] += drop
            self._lengths[l] = keep
            self.is_lossless = False  # instance attribute: the model must mask by key_positions

    def rollback(self, max_length):
        """Keep the first ``max_length`` positions of every layer (negative: drop that many from
        the end).  The undo of speculative decoding.  O(1): only lengths change.

        Positions dropped by :meth:`crop` cannot come back: rolling back below a layer's
        :meth:`first_position` raises ``ValueError`` and changes nothing.
        """
        targets = []
        for l, n in enumerate(self._lengths):
            first = self._offsets[l]
            target = self._rollback_target(max_length, first + n)
            if target < first:
                raise ValueError(
                    f"rollback({max_length}) would keep positions 0..{target - 1} of layer {l}, but crop() already "
                    f"dropped positions 0..{first - 1}: expected a length in [{first}, {first + n}] (or reset())")
            targets.append(target - first)
        self._lengths[:] = targets

    def _forget_crop(self) -> None:
        """Back to positions = slots (called by ``reset``)."""
        self._offsets = [0] * len(self._lengths)
        self.__dict__.pop("is_lossless", None)  # the class attribute (True) shows again

    def memory_bytes(self):
        """Bytes allocated by all key and value buffers (capacity, not just the used part)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(layers={len(self.keys)}, batch={self._batch}, "
                f"lengths={self._lengths}, offsets={self._offsets}, layout={self.layout!r}, "
                f"bytes={self.memory_bytes()})")
