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
one).  Two ways out: re-rotate the kept keys whenever they shift (Hugging Face's ``SinkCache``),
or store keys *before* rotation and rotate them at read time.  This cache does the second, as
the paper's reference code does: it answers :meth:`SinkKVCache.rotary_positions` (so the model
hands over unrotated keys), and after ``update`` that answer says to rotate each returned key by
``key_positions(layer_idx, in_cache=True)`` and the new queries by ``n - S .. n - 1``.  The
cache itself stays model-agnostic (it never sees a sine; it only gives positions).  Price: one
rotation of the ``n <= num_sink_tokens + window`` returned keys per layer per step --
``O(window)``, like the attention read itself -- and positions stay small, so float32 angles
never lose precision.

Precisely, with ``s = num_sink_tokens`` and ``W = window``:

* *kept*: after token ``t`` the cache holds positions ``0..s-1`` and ``t-W+1..t``;
* *seen*: query ``t`` attends to keys ``k <= t`` with ``k < s`` or ``t - k < W``;
* *positions*: one token at a time, the kept keys sit at ``0..n-1`` in time order and the query
  at ``n-1``.  A chunk of ``S`` tokens (a prompt) is returned together with the ``W-1`` tokens
  before it, numbered ``0..n-1`` in time order, and the queries are the last ``S`` of those:
  the same distances as one-at-a-time for every key but the sinks, which look a little farther
  away to late queries of the chunk -- as in StreamingLLM's own prompt handling.  A prompt of
  at most ``s + W`` tokens into an empty cache is exactly full causal attention.

Caveats: with a learned absolute position table (``pos_encoding="learned"``) positions are
still absolute and generation stays limited to ``max_seq_len``.  In a left-padded batch the
first ``s`` slots of a short row are padding, which is masked: that row runs as a plain window.
"""

from __future__ import annotations

from typing import Tuple

import torch

from ..validate import non_negative_int
from .sliding_window import SlidingWindowKVCache


class SinkKVCache(SlidingWindowKVCache):
    """The first ``num_sink_tokens`` tokens plus the ``window`` most recent ones, per layer.

    Args:
        num_sink_tokens: first tokens kept forever (StreamingLLM uses 4; 0 gives a sliding
            window with in-cache positions).
        window: most recent tokens kept (the new token included).

    Keys must be handed over *before* the rotary embedding (``transformer``'s attention does
    this because :meth:`rotary_positions` answers).  Storage: ``num_sink_tokens + window`` slots
    per layer, fixed at the first update: ``2 * B * H_kv * (num_sink_tokens + window) * head_dim``
    elements plus an int64 position per slot.  The interface is that of
    :class:`~kv_cache.long_context.sliding_window.SlidingWindowKVCache`.

    Example::

        cache = SinkKVCache(num_sink_tokens=2, window=3)
        for t in range(8):
            cache.update(torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4), layer_idx=0)
        cache.stored_positions(0)              # tensor([0, 1, 5, 6, 7])
        cache.key_positions(0, in_cache=True)  # ranks 0..4 of those keys, in storage order
    """

    positions_in_cache = True

    def __init__(self, num_sink_tokens: int, window: int):
        num_sink_tokens = non_negative_int("num_sink_tokens", num_sink_tokens)
        super().__init__(window)
        self.num_sink_tokens = num_sink_tokens

    def reset(self) -> None:
        """Forget every token and free the buffers."""
        super().reset()
        self._rotary: dict = {}  # layer -> rotary positions (keys, queries) of its last update

    def update(self, key, value, layer_idx: int, cache_position=None):
        """As :meth:`SlidingWindowKVCache.update`; ``key`` must not be rotated yet.  Also notes
        the rotary positions of this update (:meth:`rotary_positions`)."""
        out = super().update(key, value, layer_idx, cache_position)
        keys = self.key_positions(layer_idx, in_cache=True)
        n, S = keys.shape[-1], key.shape[2]
        self._rotary[layer_idx] = keys, self._arange_positions(n - S, S, keys.device)  # one tensor for all layers
        return out

    def rotary_positions(self, layer_idx: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """StreamingLLM's positions, never ``None``: after an update of ``layer_idx``, the
        positions inside the cache of the ``n`` returned keys (``key_positions(layer_idx,
        in_cache=True)``) and of the ``S`` new queries (``n - S .. n - 1``: the newest).  Before
        the layer's first update: two empty tensors.  Cost: O(1) (noted by ``update``)."""
        empty = torch.zeros(0, dtype=torch.long)
        return self._rotary.get(layer_idx, (empty, empty))
