"""``BlockPool``: KV memory cut into fixed-size blocks, lent out by a free list (PagedAttention).

The problem.  A cache that gives every request one contiguous buffer must size it for the
longest sequence the request *might* reach.  Most requests stop far earlier, so most of that
memory is reserved and never written -- the vLLM paper measured 60-80% of KV memory wasted
this way.  An operating system solved the same problem decades ago with *paging*; PagedAttention
applies it to the KV cache:

* the storage is one tensor of ``num_blocks`` **blocks**, each holding ``block_size`` tokens
  (keys and values of every layer);
* a sequence owns a **block table**: logical block ``i`` (its tokens ``i*block_size ..
  (i+1)*block_size - 1``) lives in physical block ``table[i]``, anywhere in the storage;
* a **free list** hands out blocks one at a time, only when a sequence needs one, and takes
  them back when a sequence ends.  Waste is at most one partly filled block per sequence.

Token ``p`` of a sequence sits in *slot* ``table[p // block_size] * block_size + p %
block_size`` of the storage seen as ``(num_blocks * block_size, heads, head_dim)``; reads and
writes are one ``index_select`` / ``index_copy_`` over those slots (vLLM's "slot mapping").

Sharing.  Every block has a **reference count**: two sequences with the same prefix can point
at the same physical blocks (``incref``).  A block with count > 1 is read-only; the first write
to it makes a private copy first (**copy on write**, :meth:`BlockPool.copy_block`).

Prefix caching.  A *full* block is identified by a hash of its tokens and of every token before
it (the chained hash vLLM uses; see :mod:`kv_cache.paged.prefix_cache`).  The pool keeps an index
``hash -> block``.  A block whose count drops to 0 goes back to the free list but keeps
its hash: until the block is handed out again, a new request with the same prefix can
:meth:`revive` it instead of recomputing it.  Such blocks are given out last (the free list is
ordered: never-hashed blocks first, then cached ones, oldest first).

:class:`SequenceState` is one sequence's block table and counters.  This file makes no decision
about sequences (admission, eviction): that is :class:`~kv_cache.paged.advanced.AdvancedKVCache`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

import torch

from ..errors import PoolExhaustedError

Tensor = torch.Tensor


@dataclass
class SequenceState:
    """The book-keeping of one sequence in the pool (its keys and values live in the blocks).

    ``blocks`` is the block table (``None`` = a block dropped by the sliding window; the first
    ``dropped`` entries are those); ``lengths`` the tokens written per layer; ``token_ids`` the
    tokens known so far and ``hashes`` the chained hashes of its full blocks (prefix caching);
    ``last_use`` / ``hits`` feed the eviction policies; ``pins`` > 0 protects it from eviction;
    ``flat`` records whether it was written as ``(T, H*D)`` tensors; ``indexable`` turns False
    once ``set_cache`` stored keys/values the manager cannot tie to ``token_ids`` (its blocks
    are then never entered in the prefix index).
    """

    blocks: List[Optional[int]]
    lengths: List[int]
    last_use: int = 0
    token_ids: List[int] = field(default_factory=list)
    hashes: List[bytes] = field(default_factory=list)
    hits: int = 0
    flat: Optional[bool] = None
    pins: int = 0
    dropped: int = 0
    indexable: bool = True

    @property
    def length(self) -> int:
        """Tokens written to the longest layer."""
        return max(self.lengths)

    @property
    def blocks_held(self) -> int:
        """Blocks in the table that were not dropped."""
        return sum(b is not None for b in self.blocks)


class BlockPool:
    """Physical KV storage in blocks, with a free list, reference counts and a prefix-hash index.

    Args (keyword-only):
        num_layers, num_kv_heads, head_dim: what one token stores per layer.
        block_size: tokens per block.
        max_blocks: hard cap on the number of blocks (the memory budget); the storage never
            holds more.
        dtype, device: of the storage.
        preallocate: allocate all ``max_blocks`` now; otherwise start small and double the
            storage (copying it once per doubling) up to ``max_blocks``.  While a doubling
            copies, the old storage is still alive: for that moment the process holds up to
            1.5x the budget.  Preallocate when the bound must hold at every instant.

    Storage: ``storage`` of shape ``(2, num_layers, capacity, block_size, num_kv_heads,
    head_dim)`` -- index 0 keys, 1 values.  ``capacity`` blocks are allocated (``<=
    max_blocks``); :attr:`allocated_bytes` is their size.

    Statistics (``stats`` dict): ``allocations`` (blocks handed out), ``recycled`` (of those, blocks
    that had held data before: memory reused instead of newly touched), ``grows`` (storage
    reallocations), ``cow_copies``, ``revived`` (cached blocks reused by a prefix match).
    """

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, max_blocks: int,
                 dtype: torch.dtype = torch.float32, device=None, preallocate: bool = False):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.block_size, self.max_blocks, self.preallocate = block_size, max_blocks, preallocate
        self.dtype, self.device = dtype, torch.device("cpu" if device is None else device)
        self.storage = self._new_storage(max_blocks if preallocate else min(max_blocks, 8))
        self.ref_counts: List[int] = []
        self.block_hashes: List[Optional[bytes]] = []
        self._ever_used: List[bool] = []
        self._free: "OrderedDict[int, None]" = OrderedDict()  # hand-out order: front first
        self.hash_to_block: Dict[bytes, int] = {}
        self._add_blocks(self.capacity)
        self.stats = dict(allocations=0, recycled=0, grows=0, cow_copies=0, revived=0)

    # ------------------------------------------------------------------ sizes
    def _new_storage(self, blocks: int) -> Tensor:
        shape = (2, self.num_layers, blocks, self.block_size, self.num_kv_heads, self.head_dim)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def _add_blocks(self, n: int) -> None:
        start = len(self.ref_counts)
        self.ref_counts += [0] * n
        self.block_hashes += [None] * n
        self._ever_used += [False] * n
        for b in range(start, start + n):
            self._free[b] = None

    @property
    def capacity(self) -> int:
        """Blocks currently allocated in ``storage``."""
        return self.storage.shape[2]

    @property
    def block_bytes(self) -> int:
        """Bytes of one block (keys and values of every layer)."""
        return self.storage[:, :, :1].numel() * self.storage.element_size()

    @property
    def allocated_bytes(self) -> int:
        """Bytes of storage allocated now (``capacity * block_bytes``); never above the budget."""
        return self.storage.numel() * self.storage.element_size()

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out: the free list plus the room left to grow into."""
        return len(self._free) + self.max_blocks - self.capacity

    @property
    def num_used(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.capacity - len(self._free)

    @property
    def num_cached_free(self) -> int:
        """Free blocks that still carry a prefix hash (revivable until handed out again)."""
        return sum(1 for b in self._free if self.block_hashes[b] is not None)

    # ------------------------------------------------------------------ allocation
    def allocate(self) -> int:
        """Hand out one block (reference count 1).  O(1); raises :class:`PoolExhaustedError`.

        Takes the front of the free list, growing the storage first if the list is empty and
        the budget allows.  A cached block handed out loses its hash (its content will change).
        """
        if not self._free:
            if self.capacity >= self.max_blocks:
                raise PoolExhaustedError(f"all {self.max_blocks} blocks of the pool are in use")
            self._grow()
        b, _ = self._free.popitem(last=False)
        self._drop_hash(b)
        self.ref_counts[b] = 1
        self.stats["allocations"] += 1
        self.stats["recycled"] += self._ever_used[b]
        self._ever_used[b] = True
        return b

    def _grow(self) -> None:
        """Double the storage (capped at ``max_blocks``): one copy of the old blocks."""
        new_cap = min(self.max_blocks, max(2 * self.capacity, 1))
        new = self._new_storage(new_cap)
        new[:, :, : self.capacity].copy_(self.storage)
        added = new_cap - self.capacity
        self.storage = new
        self._add_blocks(added)
        self.stats["grows"] += 1

    def incref(self, b: int) -> None:
        """One more sequence points at block ``b`` (prefix sharing / fork)."""
        self.ref_counts[b] += 1

    def decref(self, b: int) -> bool:
        """One sequence less points at ``b``; at 0 the block returns to the free list.

        Returns True if the block became free.  A hashed block goes to the *back* of the list
        (kept as long as possible for prefix reuse), an unhashed one to the front.
        """
        if self.ref_counts[b] <= 0:
            raise RuntimeError(f"block {b} is already free (reference count {self.ref_counts[b]})")
        self.ref_counts[b] -= 1
        if self.ref_counts[b]:
            return False
        self._free[b] = None
        if self.block_hashes[b] is None:
            self._free.move_to_end(b, last=False)
        return True

    def copy_block(self, src: int) -> int:
        """Copy on write: a new private block with ``src``'s content (all layers).  One block copy."""
        dst = self.allocate()
        self.storage[:, :, dst].copy_(self.storage[:, :, src])
        self.stats["cow_copies"] += 1
        return dst

    # ------------------------------------------------------------------ prefix index
    def register(self, b: int, h: bytes) -> None:
        """Record that full block ``b`` holds the tokens with chained hash ``h``.

        If another block already has ``h`` the index keeps the old one (both stay valid)."""
        self._drop_hash(b)
        self.block_hashes[b] = h
        self.hash_to_block.setdefault(h, b)

    def _drop_hash(self, b: int) -> None:
        h = self.block_hashes[b]
        if h is not None:
            if self.hash_to_block.get(h) == b:
                del self.hash_to_block[h]
            self.block_hashes[b] = None

    def unregister(self, b: int) -> None:
        """Forget ``b``'s hash: called before its content is overwritten."""
        self._drop_hash(b)

    def lookup(self, h: bytes) -> Optional[int]:
        """The block holding hash ``h`` (in use or cached-free), or ``None``."""
        return self.hash_to_block.get(h)

    def revive(self, b: int) -> None:
        """Take a reference to block ``b`` found by :meth:`lookup` (out of the free list if there)."""
        if self.ref_counts[b] == 0:
            del self._free[b]
            self.stats["revived"] += 1
        self.ref_counts[b] += 1

    def forget_cached_free(self) -> int:
        """Drop the hashes of every free block (they become plain free blocks).  Returns how many."""
        cached = [b for b in self._free if self.block_hashes[b] is not None]
        for b in cached:
            self._drop_hash(b)
            self._free.move_to_end(b, last=False)
        return len(cached)

    # ------------------------------------------------------------------ data
    def slot_view(self, kind: int, layer: int) -> Tensor:
        """Layer ``layer``'s keys (``kind=0``) or values (1) as ``(capacity * block_size, H, D)``."""
        return self.storage[kind, layer].view(-1, self.num_kv_heads, self.head_dim)

    def write(self, layer: int, slots: Tensor, key: Tensor, value: Tensor) -> None:
        """Store ``key``/``value`` ``(T, H, D)`` in ``slots`` ``(T,)`` of ``layer``.  One copy of T tokens."""
        self.slot_view(0, layer).flatten(1).index_copy_(0, slots, key.flatten(1))
        self.slot_view(1, layer).flatten(1).index_copy_(0, slots, value.flatten(1))

    def read(self, layer: int, slots: Tensor, out: Optional[Tensor] = None):
        """Gather ``(keys, values)`` ``(len(slots), H, D)`` of ``layer``: one copy of the tokens.

        ``out``: an optional ``(2, >= len(slots), H * D)`` buffer to gather into (the results are
        views of it).  A caller that reads every layer in turn can pass the same buffer each
        time: on a CPU a fresh multi-MB tensor per read costs page faults that take longer than
        the copy itself (measured, ``docs/serving.md``)."""
        T, shape = len(slots), (len(slots), self.num_kv_heads, self.head_dim)
        # Rows of H * D elements: index_select on a 2-D view is faster on a CPU than on the 3-D
        # one (measured, torch 2.13); the result is the same copy.
        if out is None:
            return tuple(self.slot_view(kind, layer).flatten(1).index_select(0, slots).view(shape) for kind in (0, 1))
        for kind in (0, 1):
            torch.index_select(self.slot_view(kind, layer).flatten(1), 0, slots, out=out[kind, :T])
        return out[0, :T].view(shape), out[1, :T].view(shape)

    # ------------------------------------------------------------------ defragmentation
    def defragment(self, shrink: bool) -> Dict[int, int]:
        """Move every block in use to the lowest ids and return the ``old -> new`` id mapping.

        Cached-free blocks are forgotten first.  With ``shrink`` the storage is then cut to the
        blocks in use (memory goes back to the allocator; later growth re-doubles it).
        Cost: one copy of every block that moves (plus one of all used blocks when shrinking).
        """
        self.forget_cached_free()
        live = [b for b in range(self.capacity) if self.ref_counts[b] > 0]
        mapping = {old: new for new, old in enumerate(live)}
        moves = [(old, new) for old, new in mapping.items() if old != new]
        if moves:
            src = torch.tensor([o for o, _ in moves], device=self.device)
            dst = torch.tensor([n for _, n in moves], device=self.device)
            self.storage.index_copy_(2, dst, self.storage.index_select(2, src))
        n = len(live)
        self.ref_counts = [self.ref_counts[b] for b in live]
        self.block_hashes = [self.block_hashes[b] for b in live]
        self._ever_used = [True] * n
        self.hash_to_block = {h: mapping[b] for h, b in self.hash_to_block.items()}
        cap = self.capacity
        if shrink and not self.preallocate and n < cap:
            self.storage = self.storage[:, :, :n].clone()
            cap = n
        self.ref_counts += [0] * (cap - n)
        self.block_hashes += [None] * (cap - n)
        self._ever_used += [True] * (cap - n)
        self._free = OrderedDict((b, None) for b in range(n, cap))
        return mapping

    def check_invariants(self, tables: Iterable[Iterable[Optional[int]]]) -> None:
        """Assert that reference counts equal the references in ``tables`` and the free list is
        exactly the unreferenced blocks (used by tests; O(blocks))."""
        counts = [0] * self.capacity
        for table in tables:
            for b in table:
                if b is not None:
                    counts[b] += 1
        assert counts == self.ref_counts, "reference counts disagree with the block tables"
        assert set(self._free) == {b for b in range(self.capacity) if counts[b] == 0}, "free list is wrong"
        assert self.capacity <= self.max_blocks
        for h, b in self.hash_to_block.items():
            assert self.block_hashes[b] == h, f"index entry of block {b} is stale"
