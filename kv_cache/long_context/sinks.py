"""``SinkKVCache``: StreamingLLM -- the first few tokens plus a sliding window.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (2023).  A model
trained with full causal attention puts a large share of every query's attention on the first
tokens of the sequence -- not because they matter, but because softmax must put its mass
somewhere and the first tokens are visible to every query.  These are *attention sinks*.  A
plain sliding window (:class:`~kv_cache.long_context.sliding_window.SlidingWindowKVCache`) evicts them as
soon as the stream passes ``window`` tokens, the attention distribution collapses, and the
perplexity explodes.  Keeping ``num_sink_tokens`` (4 in the paper) first tokens forever, plus
the ``window`` most recent ones, lets a model trained on a short context run on an endless
stream at constant memory and constant cost per token.

Positions: the part that is easy to get wrong.  The cache holds tokens ``0..s-1`` and
``t-window+1..t``; StreamingLLM gives them positions *within the cache*, ``0..s+window-1``, so
the model never sees a distance larger than the cache -- the distances it was trained on --
however long the stream.  With RoPE the position is baked into the key by a rotation, and the
in-cache position of a token changes every step (everything behind the sinks slides down by
one).  Hugging Face's ``SinkCache`` and the paper's code re-rotate every kept key each step:
``O(window)`` rotations per layer per step, as much work as the attention read itself.

This cache pays ``O(num_sink_tokens)`` instead, because RoPE is *relative*: a score depends only
on the difference of the query's and the key's rotation angles.  Sliding every window key down
by ``shift`` (the tokens dropped between the sinks and the window) and putting the query at
``t - shift`` gives exactly the distances of absolute positions, ``t - p``.  So:

* window keys are rotated **once**, at their absolute position, before ``update`` -- as for
  every other cache -- and queries at their absolute position too;
* only the ``s`` sinks must look closer than they are: sink ``j`` belongs at in-cache position
  ``j``, i.e. at distance ``(t - shift) - j`` from the query, so its key must be rotated to
  ``j + shift``.  Rotations compose (``R(a) R(b) = R(a + b)``), so the model rotates the stored
  sink key (rotated at ``j``) by ``shift`` more.

:meth:`SinkKVCache.rotary_offsets` says so after each update: the first ``m`` returned keys (the
sinks) owe a rotation by ``offsets`` ``(m,)``.  The returned sink slots are the cache's scratch
copies -- :meth:`update` restores the sink keys as they were handed over into them first -- so
the model rotates them in place.  The cache stays model-agnostic (it never sees a sine; it only
gives positions), and the model's one attention path handles any cache that owes rotations.

Precisely, with ``s = num_sink_tokens`` and ``W = window``:

* *kept*: after token ``t`` the cache holds positions ``0..s-1`` and ``t-W+1..t``;
* *seen*: query ``t`` attends to keys ``k <= t`` with ``k < s`` or ``t - k < W``;
* *distances*: one token at a time, the kept keys sit at ``0..n-1`` in time order and the query
  at ``n-1``.  A chunk of ``S`` tokens (a prompt) is returned together with the ``W-1`` tokens
  before it, numbered ``0..n-1`` in time order, and the queries are the last ``S`` of those:
  the same distances as one-at-a-time for every key but the sinks, which look a little farther
  away to late queries of the chunk -- as in StreamingLLM's own prompt handling.  A prompt of
  at most ``s + W`` tokens into an empty cache is exactly full causal attention.

Float precision: the angles are those of absolute positions, computed in float32 by the model's
rotary embedding (as for the full cache), so at position ``t`` an angle carries a rounding error
of about ``t * 2**-24`` radians (1e-3 at 16K tokens).  The old re-rotate-everything scheme used
small in-cache positions only; ``tests/test_long_context_sinks.py`` pins the two to each other.

Caveats: with a learned absolute position table (``pos_encoding="learned"``) positions are
still absolute and generation stays limited to ``max_seq_len``.  In a left-padded batch the
first ``s`` slots of a short row are padding, which is masked: that row runs as a plain window.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from ..basic.base import repeat_rows, select_rows
from ..validate import non_negative_int
from .sliding_window import SlidingWindowKVCache


class SinkKVCache(SlidingWindowKVCache):
    """The first ``num_sink_tokens`` tokens plus the ``window`` most recent ones, per layer.

    Args:
        num_sink_tokens: first tokens kept forever (StreamingLLM uses 4; 0 gives a plain
            sliding window: RoPE is relative).
        window: most recent tokens kept (the new token included).

    Keys are handed over rotated at their own positions, like for any cache.  After
    ``update``, :meth:`rotary_offsets` names the rotation the returned sink keys still owe
    (StreamingLLM's in-cache positions); ``transformer``'s attention applies it in place, ``O(s)``
    per layer and step.  Storage: ``num_sink_tokens + window`` slots per layer, fixed at the
    first update: ``2 * B * H_kv * (num_sink_tokens + window) * head_dim`` elements, plus
    ``B * H_kv * num_sink_tokens * head_dim`` for the sink keys as handed over (the returned sink
    slots are scratch) and an int64 position per slot.  The interface is that of
    :class:`~kv_cache.long_context.sliding_window.SlidingWindowKVCache`.

    Example::

        cache = SinkKVCache(num_sink_tokens=2, window=3)
        for t in range(8):
            cache.update(torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4), layer_idx=0)
        cache.stored_positions(0)              # tensor([0, 1, 5, 6, 7])
        cache.key_positions(0, in_cache=True)  # ranks 0..4 of those keys, in storage order
        cache.rotary_offsets(0)                # tensor([3, 3]): 3 tokens dropped, sinks move 3 closer
    """

    positions_in_cache = True

    def __init__(self, num_sink_tokens: int, window: int):
        num_sink_tokens = non_negative_int("num_sink_tokens", num_sink_tokens)
        super().__init__(window)
        self.num_sink_tokens = num_sink_tokens

    def reset(self) -> None:
        """Forget every token and free the buffers."""
        super().reset()
        self._sink_keys: List[Optional[torch.Tensor]] = []  # per layer: (B, H_kv, s, D), the sinks as handed over
        self._offsets: dict = {}  # layer -> rotary offsets owed by the sinks of its last update (or None)

    def update(self, key, value, layer_idx: int, cache_position=None):
        """As :meth:`SlidingWindowKVCache.update`, ``key`` rotated at its own position.

        The sink slots of the returned keys hold the sink keys as handed over; after this call
        :meth:`rotary_offsets` says how much further to rotate them.  Extra cost: two copies of
        at most ``num_sink_tokens`` keys."""
        s = self.num_sink_tokens
        if s == 0:
            return super().update(key, value, layer_idx, cache_position)
        self._grow(layer_idx)
        while len(self._sink_keys) <= layer_idx:
            self._sink_keys.append(None)
        t0, held = self._seen[layer_idx], self._sink_keys[layer_idx]
        n_old = min(t0, s)
        if n_old and held is not None and held.shape[0] == key.shape[0]:  # undo last step's in-place rotation
            self.keys[layer_idx][:, :, :n_old].copy_(held[:, :, :n_old])
        out = super().update(key, value, layer_idx, cache_position)
        n_now = min(t0 + key.shape[2], s)
        if n_now > n_old:  # new sink tokens arrived: keep them as handed over
            if held is None or held.shape[0] != key.shape[0]:
                held = self._sink_keys[layer_idx] = key.new_zeros(key.shape[0], key.shape[1], s, key.shape[3])
            held[:, :, n_old:n_now] = self.keys[layer_idx][:, :, n_old:n_now]
        shift = self._shift[layer_idx]
        self._offsets[layer_idx] = (self._sink_offsets(n_now, shift, key.device)
                                    if shift and n_now else None)
        return out

    def _sink_offsets(self, m: int, shift: int, device) -> torch.Tensor:
        """``full((m,), shift)``, one tensor shared by every layer of a step."""
        memo = getattr(self, "_offsets_memo", None)
        if memo is None or memo[0] != (m, shift) or memo[1].device != torch.device(device):
            memo = self._offsets_memo = (m, shift), torch.full((m,), shift, dtype=torch.long, device=device)
        return memo[1]

    def rotary_offsets(self, layer_idx: int) -> Optional[torch.Tensor]:
        """Rotations the keys of the last update of ``layer_idx`` still owe, or ``None``.

        ``offsets`` ``(m,)``: rotate the first ``m`` returned keys (the sinks, which are scratch
        copies) by ``offsets`` more positions -- the number of tokens dropped between the sinks
        and the window -- so that their distance to every query is StreamingLLM's in-cache
        distance.  ``None`` while nothing was dropped (or with no sinks).  Cost: O(1) (noted by
        ``update``)."""
        return self._offsets.get(layer_idx)

    def get(self, layer_idx: int):
        """The stored ``(keys, values)`` of ``layer_idx`` (storage order, sinks as handed over), or ``None``."""
        stored = super().get(layer_idx)
        if stored is not None and layer_idx < len(self._sink_keys) and self._sink_keys[layer_idx] is not None:
            n_sink = min(self._seen[layer_idx], self.num_sink_tokens)
            stored[0][:, :, :n_sink].copy_(self._sink_keys[layer_idx][:, :, :n_sink])
            self._offsets.pop(layer_idx, None)  # the scratch slots hold the unrotated sinks again
        return stored

    def batch_select_indices(self, indices) -> None:
        """Keep batch rows ``indices`` (in that order).  O(stored)."""
        if self._batch is not None:
            self._batch = select_rows((self.keys, self.values, self._padded_sinks()), indices, self._batch)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times.  O(stored * repeats)."""
        self._batch = repeat_rows((self.keys, self.values, self._padded_sinks()), repeats, self._batch)

    def _padded_sinks(self) -> List[Optional[torch.Tensor]]:
        """``_sink_keys`` as long as ``keys`` (the row helpers walk parallel lists); a layer whose
        buffer exists but holds no sink copy yet gets a zero placeholder."""
        while len(self._sink_keys) < len(self.keys):
            self._sink_keys.append(None)
        for l, buf in enumerate(self.keys):
            if buf is not None and (self._sink_keys[l] is None or self._sink_keys[l].shape[0] != buf.shape[0]):
                self._sink_keys[l] = buf.new_zeros(buf.shape[0], buf.shape[1], self.num_sink_tokens, buf.shape[3])
        return self._sink_keys

    def memory_bytes(self) -> int:
        """Bytes of every buffer held: keys, values, the sink keys as handed over, positions."""
        return super().memory_bytes() + sum(t.numel() * t.element_size() for t in self._sink_keys if t is not None)
