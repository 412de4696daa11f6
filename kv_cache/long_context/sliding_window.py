"""``SlidingWindowKVCache``: keep only the last ``window`` tokens, in a fixed ring buffer.

Sliding-window attention (Longformer, Mistral) lets each token attend to the ``window`` most
recent tokens only, itself included: query ``q`` sees keys ``q - window < k <= q``.  A key older
than that is never read again, so a cache may forget it.  Memory is then ``O(window)`` however
long the stream, and a decoding step reads ``window`` keys instead of ``t``.

* On a model *trained* with that window (``ModelConfig.sliding_window``) the cache is exact:
  cached decoding gives the logits of the uncached windowed model (tested to 1e-5).
* On a model trained with full attention it is an approximation, StreamingLLM's "window
  attention" baseline: everything older than ``window`` is forgotten.  Xiao et al. (2023) show
  that this breaks down as soon as the *first* tokens leave the window -- see
  :class:`~kv_cache.long_context.sinks.SinkKVCache` for the fix.

The ring buffer.  Each layer owns one buffer of ``window`` slots (plus ``num_sink_tokens``
pinned slots in front, zero here).  Token ``p`` goes to ring slot ``p mod window`` and
overwrites token ``p - window`` -- exactly the key the new query may no longer see.  A decoding
step therefore copies one token and returns a *view* of the whole buffer: no allocation, no
shifting.  The buffer is in ring order, not time order; attention does not care (a softmax sum
is order-free) as long as the mask uses the same order, so :meth:`key_positions` returns the
absolute position of every returned key, slot by slot.  Keys are stored as the model hands
them, i.e. already rotated by RoPE at their absolute position: relative distances inside the
window are then exactly those of the uncached model.

Long prompts.  A chunk of ``S > 1`` new tokens may not fit the ring, yet its first query needs
the ``window - 1`` tokens before the chunk and its last query needs the chunk.  So ``update``
returns those kept tokens *plus all new ones* (a temporary tensor, in time order), and only
then truncates storage to the last ``window`` -- as Hugging Face's sliding-window caches do.
:meth:`retention_mask` tells the model which query may see which returned key.

Memory: fixed at the first update: ``2 * B * H_kv * (num_sink_tokens + window) * head_dim``
elements plus ``num_sink_tokens + window`` int64 positions per layer, reported exactly by
``memory_bytes()``.  Only the ``"bhsd"`` layout is supported.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from ..basic.base import Cache, check_append, check_kv_pair, repeat_rows, select_rows
from ..validate import layer_index, positive_int

Tensor = torch.Tensor


class SlidingWindowKVCache(Cache):
    """Keeps the ``window`` most recent tokens of every layer in a ring buffer.

    Args:
        window: tokens kept per layer (>= 1); a query sees itself and the ``window - 1``
            tokens before it.

    ``update(key, value, layer_idx, cache_position=None)`` takes ``(B, H_kv, S, D)`` tensors
    and only appends (``cache_position`` must be ``None`` or the next ``S`` positions).
    ``get_seq_length`` is the number of tokens *seen* -- the absolute position of the next
    token -- while :meth:`stored_length` is what is kept (at most ``window``).
    ``crop(n)`` keeps only the ``n`` most recent of those (a smaller window until it refills);
    ``rollback(n)`` undoes the newest tokens, only while nothing was evicted.

    Example::

        cache = SlidingWindowKVCache(window=4)
        for t in range(6):
            k, v = cache.update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), layer_idx=0)
        cache.key_positions(0)       # tensor([4, 5, 2, 3]): ring order, the last 4 tokens
        cache.get_seq_length(0)      # 6 tokens seen
    """

    is_lossless = False
    layout = "bhsd"

    def __init__(self, window: int):
        self.window = positive_int("window", window)
        self.num_sink_tokens = 0
        self.reset()

    # ------------------------------------------------------------------ bookkeeping
    def reset(self) -> None:
        """Forget every token and free the buffers."""
        self.keys: List[Optional[Tensor]] = []
        self.values: List[Optional[Tensor]] = []
        self._pos: List[Optional[Tensor]] = []       # absolute position held by each storage slot
        self._seen: List[int] = []                   # tokens seen = next absolute position
        self._head: List[int] = []                   # next ring slot to overwrite
        self._ring: List[int] = []                   # tokens held in the ring (<= window)
        self._returned: List[Optional[Tensor]] = []  # positions of the keys the last update returned
        self._shift: List[int] = []                  # tokens dropped between the sinks and those keys
        self._batch: Optional[int] = None

    @property
    def capacity(self) -> int:
        """Token slots per layer: ``num_sink_tokens + window``."""
        return self.num_sink_tokens + self.window

    def _grow(self, layer_idx: int) -> None:
        layer_index(layer_idx)
        while len(self.keys) <= layer_idx:
            for lst, empty in ((self.keys, None), (self.values, None), (self._pos, None), (self._seen, 0),
                               (self._head, 0), (self._ring, 0), (self._returned, None), (self._shift, 0)):
                lst.append(empty)

    def _counts(self, layer_idx: int):
        """(sink tokens stored, ring tokens stored) of a layer."""
        return min(self._seen[layer_idx], self.num_sink_tokens), self._ring[layer_idx]

    def stored_length(self, layer_idx: int = 0) -> int:
        """Tokens actually held by ``layer_idx`` (at most ``num_sink_tokens + window``)."""
        if layer_idx >= len(self.keys):
            return 0
        return sum(self._counts(layer_idx))

    def stored_positions(self, layer_idx: int = 0) -> Tensor:
        """Absolute positions of the tokens ``layer_idx`` holds now, in time order."""
        n = self.stored_length(layer_idx)
        if n == 0:
            return torch.zeros(0, dtype=torch.long)
        return self._pos[layer_idx][:n].sort().values

    def _prepare(self, layer_idx: int, key: Tensor, value: Tensor) -> None:
        """Allocate the layer's buffers on its first write; otherwise check the new tensors fit."""
        B, H = key.shape[:2]
        if self._batch is not None and B != self._batch and any(self._seen):
            raise ValueError(
                f"key for layer {layer_idx} has batch size {B}, but the cache holds {self._batch} rows; "
                f"use batch_select_indices / batch_repeat_interleave to change the batch, or reset()")
        buf_k, buf_v = self.keys[layer_idx], self.values[layer_idx]
        if buf_k is None or buf_k.shape[0] != B:
            cap = self.capacity
            self.keys[layer_idx] = key.new_zeros(B, H, cap, key.shape[3])
            self.values[layer_idx] = value.new_zeros(B, H, cap, value.shape[3])
            self._pos[layer_idx] = torch.full((cap,), -1, dtype=torch.long, device=key.device)
        else:
            for name, new, buf in (("key", key, buf_k), ("value", value, buf_v)):
                if new.shape[1] != buf.shape[1] or new.shape[3] != buf.shape[3] or new.dtype != buf.dtype \
                        or new.device != buf.device:
                    raise ValueError(
                        f"{name} for layer {layer_idx} has shape {tuple(new.shape)} ({new.dtype}, {new.device}); "
                        f"the layer stores {buf.shape[1]} heads of dim {buf.shape[3]} ({buf.dtype}, {buf.device})")
        self._batch = B

    # ------------------------------------------------------------------ Cache API
    def update(self, key: Tensor, value: Tensor, layer_idx: int, cache_position=None):
        """Append ``S`` tokens to ``layer_idx``; return every key/value some new query may see.

        ``S == 1``: the token overwrites the oldest ring slot; returns views of the buffer
        (ring order, ``min(seen, capacity)`` keys).  Cost: one token copied.
        ``S > 1``: returns sinks + the ``window - 1`` newest old tokens + all ``S`` new ones in
        time order (a new tensor), then keeps the last ``window``.  Cost: ``O(window + S)``.
        """
        check_kv_pair(key, value, layer_idx)
        self._grow(layer_idx)
        start, S = self._seen[layer_idx], key.shape[2]
        check_append(cache_position, start, S, type(self).__name__)
        self._prepare(layer_idx, key, value)
        if S == 1:
            return self._append_one(layer_idx, key, value)
        return self._append_chunk(layer_idx, key, value)

    def _append_one(self, l: int, key: Tensor, value: Tensor):
        s, t = self.num_sink_tokens, self._seen[l]
        if t < s:
            slot = t  # still filling the pinned first slots
        else:
            slot = s + self._head[l]
            self._head[l] = (self._head[l] + 1) % self.window
            self._ring[l] = min(self._ring[l] + 1, self.window)
        self.keys[l][:, :, slot].copy_(key[:, :, 0])
        self.values[l][:, :, slot].copy_(value[:, :, 0])
        self._pos[l][slot] = t
        self._seen[l] = t + 1
        n = self.stored_length(l)  # storage [0, n) is contiguous: sinks, then the ring
        self._returned[l] = self._pos[l][:n]
        self._shift[l] = self._seen[l] - n  # every dropped token lies between the sinks and the ring
        return self.keys[l][:, :, :n], self.values[l][:, :, :n]

    def _ring_in_time_order(self, l: int, buf: Tensor) -> Tensor:
        """The ring part of ``buf`` (last dim: slots) oldest first."""
        s, (_, n_ring) = self.num_sink_tokens, self._counts(l)
        if n_ring < self.window:  # never wrapped: slots were filled in order
            return buf[..., s:s + n_ring]
        h = self._head[l]
        return torch.cat([buf[..., s + h:], buf[..., s:s + h]], dim=-1)

    def _append_chunk(self, l: int, key: Tensor, value: Tensor):
        s, W, t0, S = self.num_sink_tokens, self.window, self._seen[l], key.shape[2]
        n_sink, n_ring = self._counts(l)
        keep_old = min(n_ring, W - 1)  # the first new query (position t0) sees t0-W+1 .. t0
        new_pos = torch.arange(t0, t0 + S, device=key.device)
        ring_pos = self._ring_in_time_order(l, self._pos[l])[n_ring - keep_old:]
        out = []
        for buf, new in ((self.keys[l], key), (self.values[l], value)):
            ring = self._ring_in_time_order(l, buf.transpose(2, 3)).transpose(2, 3)[:, :, n_ring - keep_old:]
            out.append(torch.cat([buf[:, :, :n_sink], ring, new], dim=2))
        pos = torch.cat([self._pos[l][:n_sink], ring_pos, new_pos])
        # Store: new tokens with position < s become sinks; the ring keeps the last W of the rest.
        n_new_sinks = max(0, min(s - t0, S))
        for buf, full in zip((self.keys[l], self.values[l]), out):
            buf[:, :, t0:t0 + n_new_sinks] = full[:, :, n_sink:n_sink + n_new_sinks]
        self._pos[l][t0:t0 + n_new_sinks] = new_pos[:n_new_sinks]
        first_recent = n_sink + n_new_sinks  # index (in ``out``) of the first non-sink token
        m = min(W, pos.numel() - first_recent)
        if m > 0:
            for buf, full in zip((self.keys[l], self.values[l]), out):
                buf[:, :, s:s + m] = full[:, :, -m:]
            self._pos[l][s:s + m] = pos[-m:]
            self._ring[l] = m  # the ring now holds these m tokens in time order from slot s
        self._head[l] = m % W
        self._seen[l] = t0 + S
        self._returned[l] = pos
        # returned keys are in time order, so their in-cache positions are 0..n-1
        self._shift[l] = (t0 - keep_old if keep_old else max(t0, s)) - s if pos.numel() > first_recent else 0
        return out[0], out[1]

    def key_positions(self, layer_idx: int, in_cache: bool = False) -> Tensor:
        """Positions ``(n,)`` of the keys the last ``update`` of ``layer_idx`` returned, in returned order.

        ``in_cache=False``: absolute positions.  ``in_cache=True``: rank among the returned keys
        (sinks keep theirs, the rest move down by the number of dropped tokens).  O(n).
        """
        if layer_idx >= len(self._returned) or self._returned[layer_idx] is None:
            raise ValueError(f"layer {layer_idx} of this {type(self).__name__} has not been updated yet")
        pos = self._returned[layer_idx]
        shift = self._shift[layer_idx]
        if not in_cache or shift == 0:
            return pos
        return torch.where(pos >= self.num_sink_tokens, pos - shift, pos)

    def retention_mask(self, query_positions: Tensor, key_positions: Tensor) -> Tensor:
        """``(..., S, n)``: True where ``q - k < window`` (or ``k`` is a sink token)."""
        q, k = query_positions.unsqueeze(-1), key_positions.unsqueeze(-2)
        keep = (q - k) < self.window
        if self.num_sink_tokens:
            keep = keep | (k < self.num_sink_tokens)
        return keep

    def get(self, layer_idx: int):
        """The stored ``(keys, values)`` of ``layer_idx`` (storage order), or ``None``."""
        n = self.stored_length(layer_idx)
        if n == 0:
            return None
        return self.keys[layer_idx][:, :, :n], self.values[layer_idx][:, :, :n]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen by ``layer_idx`` (the absolute position of the next one), not tokens stored."""
        return self._seen[layer_idx] if layer_idx < len(self._seen) else 0

    def get_max_cache_shape(self) -> int:
        """Tokens held per layer at most: ``num_sink_tokens + window``."""
        return self.capacity

    def batch_select_indices(self, indices) -> None:
        """Keep batch rows ``indices`` (in that order).  O(stored)."""
        if self._batch is not None:
            self._batch = select_rows((self.keys, self.values), indices, self._batch)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times.  O(stored * repeats)."""
        self._batch = repeat_rows((self.keys, self.values), repeats, self._batch)

    def crop(self, max_length: int) -> None:
        """Keep only the ``max_length`` most recent tokens of every layer (``max_length >= 0``).

        Positions do not move: ``get_seq_length`` is still the position of the next token and
        ``key_positions`` / ``stored_positions`` name the kept ones.  The ring then holds fewer
        than ``window`` tokens and refills as tokens arrive.  A layer holding at most
        ``max_length`` tokens is unchanged.  Attention sinks are never dropped: a
        :class:`~kv_cache.long_context.sinks.SinkKVCache` that would lose some raises ``ValueError`` (and
        changes nothing).  Cost: one gather of the kept tokens per layer.
        """
        keep = self._crop_count(max_length)
        s = self.num_sink_tokens
        for l in range(len(self.keys)):
            n = self.stored_length(l)
            if s and n > keep:
                raise ValueError(
                    f"crop({max_length}) on layer {l}: a {type(self).__name__} keeps its first num_sink_tokens={s} "
                    f"tokens for good (the attention sinks), and keeping only the {max_length} most recent of its {n} "
                    f"tokens would drop them; expected max_length >= {n}. Use SlidingWindowKVCache(window="
                    f"{max(max_length, 1)}) to keep only recent tokens, or rollback() / reset()")
        for l in range(len(self.keys)):
            n_ring = self._ring[l]
            if n_ring <= keep:
                continue
            slots = self._ring_in_time_order(l, torch.arange(self.capacity, device=self._pos[l].device))
            slots = slots[n_ring - keep:]  # the newest ``keep`` ring slots, oldest first (s == 0 here)
            for buf in (self.keys[l], self.values[l]):
                buf[:, :, :keep] = buf.index_select(2, slots)
            self._pos[l][:keep] = self._pos[l].index_select(0, slots)
            self._pos[l][keep:] = -1
            self._ring[l], self._head[l] = keep, keep % self.window
            self._returned[l] = self._pos[l][:keep]
            self._shift[l] = self._seen[l] - keep

    def rollback(self, max_length: int) -> None:
        """Roll back to the first ``max_length`` tokens (negative: drop that many from the end).

        Only possible while nothing has been evicted or cropped (a dropped key cannot come
        back); otherwise raises ``ValueError`` and changes nothing.  O(1).
        """
        targets = [self._rollback_target(max_length, seen) for seen in self._seen]
        for l, (seen, target) in enumerate(zip(self._seen, targets)):
            if target != seen and self.stored_length(l) < seen:
                raise ValueError(
                    f"rollback({max_length}) on layer {l}: {seen} tokens were seen but only {self.stored_length(l)} "
                    f"are kept; a {type(self).__name__} cannot roll back past tokens it already evicted")
        for l, target in enumerate(targets):
            if target == self._seen[l]:
                continue
            self._seen[l] = target
            self._ring[l] = min(max(target - self.num_sink_tokens, 0), self.window)
            self._head[l] = self._ring[l] % self.window
            self._returned[l] = None if self._pos[l] is None else self._pos[l][:self.stored_length(l)]
            self._shift[l] = 0

    def memory_bytes(self) -> int:
        """Bytes of every buffer held: keys, values and the position table."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values + self._pos if t is not None)

    def __repr__(self) -> str:
        sinks = f"num_sink_tokens={self.num_sink_tokens}, " if self.num_sink_tokens else ""
        return (f"{type(self).__name__}({sinks}window={self.window}, layers={len(self.keys)}, batch={self._batch}, "
                f"seen={self._seen}, bytes={self.memory_bytes()})")
