"""``CacheConfig`` and ``EvictionPolicy``: how big the paged KV memory manager is, and what it
does when it is full.

A serving system does not keep one cache per request: it keeps one *pool* of KV memory with a
hard budget (``memory_limit_mb``) and lends it to many requests at once.  This file holds the
numbers that size such a pool (:class:`~kv_cache.paged.advanced.AdvancedKVCache`) and the choice of
what to throw away when the budget is reached.

Memory of one token, all layers, keys and values::

    bytes_per_token = 2 * num_layers * num_kv_heads * head_dim * dtype_bytes

The pool is cut into *blocks* of ``block_size`` tokens (``bytes_per_block = block_size *
bytes_per_token``) and holds at most ``max_blocks = floor(memory_limit_mb * 2**20 /
bytes_per_block)`` of them.  "MB" here means MiB (``2**20`` bytes), as ``torch`` reports it.

:func:`create_cache_config_for_speculative_decoding` returns a matching draft/target pair.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from ..validate import positive_int


class EvictionPolicy(str, enum.Enum):
    """What the pool frees when a new block (or a new sequence slot) does not fit.

    ``NONE``
        Never evict: a full pool raises :class:`~kv_cache.errors.PoolExhaustedError`.  Results
        are reproducible (nothing disappears behind your back).
    ``LRU``
        Free *whole sequences*, least recently used first.  A sequence is "used" by every
        successful operation on it (add, write, read hit, fork, crop).
    ``SLIDING_WINDOW``
        Free the *oldest blocks* of sequences: a block is dropped once every one of its tokens
        is more than ``sliding_window_size`` tokens behind the sequence's end (the newest
        ``sliding_window_size`` tokens always stay).  Least recently used sequences are trimmed
        first.  If no block lies outside a window, falls back to LRU whole-sequence eviction.
        Without a ``sliding_window_size`` the window is ``max_sequence_length``: no sequence can
        outgrow it, so nothing is trimmed and the policy behaves as ``LRU`` (no sequence ever
        loses its first tokens unless you ask for a smaller window).
    ``ADAPTIVE``
        Free whole sequences chosen from how each one is *used*: the score is
        ``read hits of the sequence / blocks it holds`` -- the value it returned per byte it
        occupies.  The lowest score goes first (a long sequence nobody reads is the cheapest to
        lose); ties go to the least recently used.

    The string values (``"none"``, ``"lru"``, ``"sliding_window"``, ``"adaptive"``) are accepted
    wherever a policy is expected.
    """

    NONE = "none"
    LRU = "lru"
    SLIDING_WINDOW = "sliding_window"
    ADAPTIVE = "adaptive"


@dataclass
class CacheConfig:
    """Shape, budget and policy of an :class:`~kv_cache.paged.advanced.AdvancedKVCache`.

    Attributes:
        max_batch_size: most sequences held at once (a new one beyond that evicts one, or
            raises under ``EvictionPolicy.NONE``).
        max_sequence_length: most tokens one sequence may hold.
        embed_dim: model width; ``head_dim`` defaults to ``embed_dim // num_heads``.
        num_heads: query heads of the model.
        num_layers: attention layers; ``layer_id`` runs over ``0..num_layers-1``.
        eviction_policy: an :class:`EvictionPolicy` (or its string value).
        sliding_window_size: tokens kept per sequence by ``SLIDING_WINDOW`` (unused by the other
            policies).  ``None`` (default) means ``max_sequence_length``
            (:attr:`window_tokens`): a window no sequence can outgrow, so ``SLIDING_WINDOW``
            without a size trims nothing and evicts whole least recently used sequences.
        memory_limit_mb: hard budget of the KV storage in MiB; the pool never allocates more.
        preallocate_memory: allocate the whole budget at construction (no growth, fixed
            addresses, and the budget holds at every instant) instead of growing the storage
            geometrically up to the budget (the pool never *keeps* more than the budget, but
            during one growth copy the old storage briefly coexists with the new).
        use_memory_pool: ``True`` (default): the paged pool -- a sequence takes a block only
            when it needs one, and blocks are shared by prefixes.  ``False``: each sequence
            reserves ``max_sequence_length`` tokens when it is created, the way servers worked
            before PagedAttention (kept as the baseline the benchmark measures, and because a
            reservation can never run out mid-sequence).
        block_size: tokens per block (vLLM uses 16).
        num_kv_heads: key/value heads stored (grouped-query attention); default ``num_heads``.
        head_dim: size of one head; default ``embed_dim // num_heads``.
        dtype, device: storage dtype and device; writes must match (no silent casts).
        enable_prefix_caching: remember full blocks by a hash of their token ids so a later
            request with the same prefix reuses them (only with ``use_memory_pool=True``: a
            per-sequence reservation shares nothing).
        max_remembered_ids: how many ids of sequences that are gone (cleared or *evicted*) the
            manager remembers, oldest forgotten first.  Remembering an evicted id is what lets
            the manager refuse to *continue* it (an append would otherwise restart it empty and
            the model would decode without its context).  Cost: one dictionary entry per id
            (~100-200 bytes), so the default 16384 bounds it to a few MiB of host memory.  An
            id evicted more than ``max_remembered_ids`` departures ago reads as never seen.

    Everything is validated on construction; the errors name the field, the value and what
    was expected.  Example (the numbers of the reference guide's mobile preset)::

        cfg = CacheConfig(max_batch_size=4, max_sequence_length=512, embed_dim=256, num_heads=8,
                          num_layers=12, eviction_policy=EvictionPolicy.LRU, memory_limit_mb=64)
        cfg.max_blocks        # 64 MiB / (16 tokens * 2 * 12 layers * 256 * 4 bytes) = 170
    """

    max_batch_size: int
    max_sequence_length: int
    embed_dim: int
    num_heads: int
    num_layers: int
    eviction_policy: Union[EvictionPolicy, str] = EvictionPolicy.LRU
    sliding_window_size: Optional[int] = None
    memory_limit_mb: float = 256.0
    preallocate_memory: bool = False
    use_memory_pool: bool = True
    block_size: int = 16
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    dtype: torch.dtype = torch.float32
    device: Union[str, torch.device] = "cpu"
    enable_prefix_caching: bool = True
    max_remembered_ids: int = 16384

    def __post_init__(self):
        if self.num_kv_heads is None and isinstance(self.num_heads, int):
            self.num_kv_heads = self.num_heads
        if self.head_dim is None and isinstance(self.embed_dim, int) and isinstance(self.num_heads, int) \
                and self.num_heads > 0:
            if self.embed_dim % self.num_heads:
                raise ValueError(f"CacheConfig.embed_dim={self.embed_dim} must be divisible by num_heads="
                                 f"{self.num_heads} (or pass head_dim explicitly)")
            self.head_dim = self.embed_dim // self.num_heads
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the first field that cannot work."""
        for name in ("max_batch_size", "max_sequence_length", "embed_dim", "num_heads", "num_layers",
                     "block_size", "num_kv_heads", "head_dim", "max_remembered_ids"):
            positive_int(f"CacheConfig.{name}", getattr(self, name))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"CacheConfig.num_heads={self.num_heads} must be a multiple of num_kv_heads="
                             f"{self.num_kv_heads} (each key/value head serves a group of query heads)")
        try:
            self.eviction_policy = EvictionPolicy(self.eviction_policy)
        except ValueError:
            raise ValueError(f"CacheConfig.eviction_policy={self.eviction_policy!r} is not known; expected one of "
                             f"{[p.value for p in EvictionPolicy]}") from None
        if self.sliding_window_size is not None:
            positive_int("CacheConfig.sliding_window_size", self.sliding_window_size)
        if isinstance(self.memory_limit_mb, bool) or not isinstance(self.memory_limit_mb, (int, float)) \
                or not math.isfinite(self.memory_limit_mb) or self.memory_limit_mb <= 0:
            raise ValueError(f"CacheConfig.memory_limit_mb must be a positive number of MiB, "
                             f"got {self.memory_limit_mb!r}")
        for name in ("preallocate_memory", "use_memory_pool", "enable_prefix_caching"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"CacheConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.dtype, torch.dtype):
            raise TypeError(f"CacheConfig.dtype must be a torch.dtype (e.g. torch.float16), got {self.dtype!r}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"CacheConfig.device={self.device!r} is not a device torch understands") from None
        if self.max_blocks < 1:
            raise ValueError(
                f"CacheConfig.memory_limit_mb={self.memory_limit_mb} MiB is smaller than one block "
                f"({self.bytes_per_block} bytes = block_size {self.block_size} x {self.bytes_per_token} bytes per "
                f"token)")
        if not self.use_memory_pool and self.blocks_per_max_sequence > self.max_blocks:
            raise ValueError(
                f"CacheConfig.memory_limit_mb={self.memory_limit_mb} MiB holds {self.max_blocks} blocks, but "
                f"use_memory_pool=False reserves max_sequence_length={self.max_sequence_length} tokens "
                f"({self.blocks_per_max_sequence} blocks) per sequence: not even one sequence fits")

    # ------------------------------------------------------------------ derived sizes
    @property
    def window_tokens(self) -> int:
        """Tokens ``SLIDING_WINDOW`` keeps per sequence: ``sliding_window_size``, or
        ``max_sequence_length`` when it is ``None`` (a window nothing outgrows: no trimming)."""
        return self.max_sequence_length if self.sliding_window_size is None else self.sliding_window_size

    @property
    def bytes_per_token(self) -> int:
        """Keys + values of one token over all layers: ``2 * layers * kv_heads * head_dim * itemsize``."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block: ``block_size * bytes_per_token``."""
        return self.block_size * self.bytes_per_token

    @property
    def max_blocks(self) -> int:
        """Blocks that fit the budget: ``floor(memory_limit_mb * 2**20 / bytes_per_block)``."""
        return int(self.memory_limit_mb * 2 ** 20 // self.bytes_per_block)

    @property
    def blocks_per_max_sequence(self) -> int:
        """Blocks one sequence of ``max_sequence_length`` tokens needs."""
        return -(-self.max_sequence_length // self.block_size)

    @property
    def max_tokens(self) -> int:
        """Tokens the whole budget can hold (``max_blocks * block_size``)."""
        return self.max_blocks * self.block_size


def create_cache_config_for_speculative_decoding(
    *,
    draft_num_layers: int = 4, draft_embed_dim: int = 256, draft_num_heads: int = 4,
    target_num_layers: int = 12, target_embed_dim: int = 768, target_num_heads: int = 12,
    max_batch_size: int = 8, max_sequence_length: int = 1024, memory_limit_mb: float = 512.0,
    draft_memory_fraction: float = 0.25, draft_window: int = 256, block_size: int = 16,
    dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu",
) -> Tuple[CacheConfig, CacheConfig]:
    """Two configs for a speculative-decoding pair: ``(draft_config, target_config)``.

    * The **draft** model proposes tokens that the target then checks; its cache may be lossy
      (the acceptance rule makes the output follow the *target's* distribution whatever the
      draft does), so it gets ``SLIDING_WINDOW`` with ``draft_window`` tokens and
      ``draft_memory_fraction`` of ``memory_limit_mb``.
    * The **target** model's cache must be exact: ``EvictionPolicy.NONE`` (a full pool is an
      error, never a silent loss) with the rest of the budget.

    Both share ``block_size``, ``max_batch_size`` and ``max_sequence_length`` (the two models
    walk the same token sequence; rollback is ``crop_sequence`` on both).  With no arguments it
    returns the sizes of a GPT-2-small target with a 4-layer draft.
    """
    if not 0.0 < draft_memory_fraction < 1.0:
        raise ValueError(f"draft_memory_fraction must be in (0, 1), got {draft_memory_fraction!r}")
    common = dict(max_batch_size=max_batch_size, max_sequence_length=max_sequence_length, block_size=block_size,
                  dtype=dtype, device=device)
    draft = CacheConfig(embed_dim=draft_embed_dim, num_heads=draft_num_heads, num_layers=draft_num_layers,
                        eviction_policy=EvictionPolicy.SLIDING_WINDOW, sliding_window_size=draft_window,
                        memory_limit_mb=memory_limit_mb * draft_memory_fraction, **common)
    target = CacheConfig(embed_dim=target_embed_dim, num_heads=target_num_heads, num_layers=target_num_layers,
                         eviction_policy=EvictionPolicy.NONE,
                         memory_limit_mb=memory_limit_mb * (1.0 - draft_memory_fraction), **common)
    return draft, target


def check_kv_write(config: CacheConfig, device: torch.device, key: torch.Tensor, value: torch.Tensor,
                   batched: bool) -> Tuple[torch.Tensor, torch.Tensor, bool]:
    """Check a write against ``config`` and return ``(key, value, flat)`` with ``(..., T, H, D)`` tensors.

    One sequence: ``(T, num_kv_heads, head_dim)`` or flat ``(T, num_kv_heads * head_dim)``
    (``flat`` is then True); a batch: ``(B, T, num_kv_heads, head_dim)``.  dtype and device must
    match the config exactly (no silent casts).  Errors name the tensor, its shape and what was
    expected.
    """
    lead = 1 if batched else 0
    want = "(B, T, num_kv_heads, head_dim)" if batched else \
        "(T, num_kv_heads, head_dim) or (T, num_kv_heads * head_dim)"
    for name, t in (("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        flat = t.dim() == 2 and not batched
        ok_shape = (flat and t.shape[-1] == config.num_kv_heads * config.head_dim) or \
            (t.dim() == 3 + lead and tuple(t.shape[-2:]) == (config.num_kv_heads, config.head_dim))
        if not ok_shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {want} with num_kv_heads="
                             f"{config.num_kv_heads}, head_dim={config.head_dim}")
        if t.dtype != config.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}, expected the cache's dtype {config.dtype} (cast it first)")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected the cache's device {device}")
    if key.shape != value.shape:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must have the same shape")
    flat = key.dim() == 2
    if flat:
        key, value = (t.view(t.shape[0], config.num_kv_heads, config.head_dim) for t in (key, value))
    return key, value, flat
