"""``BlockManager`` and ``PagedBatch``: the paged pool as the memory of a serving engine.

A serving engine runs many sequences in one forward pass and changes the set every step: a
finished sequence leaves, a waiting one joins, a long prompt arrives in chunks.  vLLM's answer,
which this module follows, splits the work in two:

* **once per step, on the host** -- the :class:`BlockManager` decides where every new token's
  keys and values go.  It owns each sequence's block table over a
  :class:`~kv_cache.paged.block_pool.BlockPool`, takes blocks from the free list only when a
  sequence crosses a block boundary, shares the full blocks of a prompt prefix it has seen
  before (:mod:`~kv_cache.paged.prefix_cache`), and gives everything back when a sequence ends
  or is preempted.  It never evicts on its own: :meth:`BlockManager.blocks_needed` against
  :attr:`BlockManager.num_free_blocks` tells the engine's scheduler whether a step fits, and the
  scheduler preempts if it does not;
* **once per layer, on the device** -- a :class:`PagedBatch` is the step as the model's forward
  pass sees it (the ``Cache`` questions): ``update`` writes the step's keys and values into
  their slots with one ``index_copy_`` and reads every key the step's queries may see with one
  ``index_select``; ``key_positions`` and ``retention_mask`` tell the model's one mask builder
  which position each key holds and which sequence it belongs to.

The step is *packed*: the ``S`` new tokens of all sequences (a decode token for some, a prompt
chunk for others) are one row, ``(1, S)``, and the keys are the sequences' histories one after
another, ``(1, N, H_kv, D)``.  A query sees a key iff they belong to the same sequence and the
key's position is not after the query's (causality by positions): a block-diagonal causal mask,
built by the model from what this cache reports.  Nothing is padded.  The price on this path is
the gather: each step copies the ``N`` keys it reads (a fused paged-attention kernel would read
the blocks in place).  This module knows no model.
"""

from __future__ import annotations

from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import torch

from .block_pool import BlockPool, SequenceState
from .prefix_cache import match_cached_blocks, register_full_blocks, token_list

Tensor = torch.Tensor


class BlockManager:
    """Block tables of many sequences over one :class:`BlockPool`, with prefix caching.

    Args:
        pool: the storage (its ``max_blocks`` is the memory budget; never exceeded).
        enable_prefix_caching: share the full blocks of a prompt prefix computed before.

    A sequence's life: :meth:`allocate` (returns how many prompt tokens are already cached),
    then per step :meth:`slots` for its new tokens (takes blocks) and :meth:`commit` after the
    forward pass wrote them; :meth:`free` at the end or on preemption.  Host-only, O(blocks
    touched) per call; the one device tensor per step is built by :meth:`batch`.
    """

    def __init__(self, pool: BlockPool, enable_prefix_caching: bool = True):
        if not isinstance(pool, BlockPool):
            raise TypeError(f"pool must be a BlockPool, got {type(pool).__name__}")
        self.pool, self.block_size = pool, pool.block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.seqs: Dict[Hashable, SequenceState] = {}
        self.prefix_query_tokens = self.prefix_hit_tokens = 0

    # ------------------------------------------------------------------ sizes
    @property
    def num_free_blocks(self) -> int:
        """Blocks that may still be handed out: the free list plus the budget not yet allocated."""
        return self.pool.num_free + self.pool.max_blocks - self.pool.capacity

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.pool.num_used

    def length(self, sid: Hashable) -> int:
        """Tokens of ``sid`` whose keys and values are in the pool."""
        return self.seqs[sid].lengths[0]

    def blocks_needed(self, sid: Hashable, n: int) -> int:
        """Blocks writing ``n`` more tokens of ``sid`` takes: new blocks, plus a copy of a shared
        block the first of them lands in (copy on write)."""
        seq, bs = self.seqs[sid], self.block_size
        start = seq.lengths[0]
        if n <= 0:
            return 0
        last = (start + n - 1) // bs
        shared = start // bs < len(seq.blocks) and self.pool.ref_counts[seq.blocks[start // bs]] > 1
        return max(0, last + 1 - len(seq.blocks)) + int(shared)

    # ------------------------------------------------------------------ life cycle
    def allocate(self, sid: Hashable, token_ids: Sequence[int]) -> int:
        """Start sequence ``sid`` whose known tokens are ``token_ids``; return how many of them
        are already cached (full blocks of a prefix seen before, at most ``len - 1`` so that the
        last token is computed: its logits are needed).  Takes no free block."""
        if sid in self.seqs:
            raise ValueError(f"sequence id {sid!r} is already allocated; free it first")
        ids = token_list(token_ids)
        blocks, hashes = (match_cached_blocks(self.pool, ids, self.block_size)
                          if self.enable_prefix_caching and ids else ([], []))
        cached = min(len(blocks) * self.block_size, max(len(ids) - 1, 0))
        keep = -(-cached // self.block_size)  # blocks holding the cached tokens
        for b in blocks[:keep]:
            self.pool.revive(b)
        self.seqs[sid] = SequenceState(blocks=blocks[:keep], lengths=[cached], token_ids=ids,
                                       hashes=hashes[:cached // self.block_size])
        self.prefix_query_tokens += len(ids)
        self.prefix_hit_tokens += cached
        return cached

    def slots(self, sid: Hashable, n: int) -> List[int]:
        """Storage slots for the next ``n`` tokens of ``sid`` (``table[p // bs] * bs + p % bs``),
        taking new blocks and copying a shared one first.  Check :meth:`blocks_needed` against :attr:`num_free_blocks` before:
        an exhausted pool raises :class:`~kv_cache.errors.PoolExhaustedError`."""
        seq, bs = self.seqs[sid], self.block_size
        start = seq.lengths[0]
        first = start // bs
        if n and first < len(seq.blocks):
            b = seq.blocks[first]
            if self.pool.ref_counts[b] > 1:  # shared: this sequence writes into a private copy
                seq.blocks[first] = self.pool.copy_block(b)
                self.pool.decref(b)
                del seq.hashes[first:]
            elif self.pool.block_hashes[b] is not None:  # its content is about to change
                self.pool.unregister(b)
                del seq.hashes[first:]
        while len(seq.blocks) * bs < start + n:
            seq.blocks.append(self.pool.allocate())
        return [seq.blocks[p // bs] * bs + p % bs for p in range(start, start + n)]

    def commit(self, sid: Hashable, n: int, token_ids: Sequence[int] = ()) -> None:
        """The forward pass wrote ``n`` more tokens of ``sid``; ``token_ids`` are tokens newly
        known (generated) for the prefix index.  Full blocks enter the index."""
        seq = self.seqs[sid]
        seq.lengths[0] += n
        seq.token_ids.extend(token_ids)
        # (the check first: a serving engine commits every token, and few complete a block)
        if self.enable_prefix_caching and min(seq.lengths[0], len(seq.token_ids)) // self.block_size > len(seq.hashes):
            register_full_blocks(self.pool, seq, self.block_size)

    def cancel(self, sid: Hashable) -> None:
        """Undo an :meth:`allocate` whose request could not be admitted after all: free its
        blocks and take its prompt back out of the prefix-cache counters (tried again later, it
        is counted then)."""
        seq = self.seqs[sid]
        self.prefix_query_tokens -= len(seq.token_ids)
        self.prefix_hit_tokens -= seq.lengths[0]
        self.free(sid)

    def free(self, sid: Hashable) -> None:
        """Give ``sid``'s blocks back (hashed ones stay revivable until handed out again)."""
        seq = self.seqs.pop(sid)
        for b in reversed(seq.blocks):  # the tail first: the prompt's blocks stay cached longest
            self.pool.decref(b)

    def check_invariants(self) -> None:
        """Assert the pool's reference counts and free list match the block tables (tests)."""
        self.pool.check_invariants(s.blocks for s in self.seqs.values())
        for sid, s in self.seqs.items():
            assert len(s.blocks) * self.block_size >= s.lengths[0], f"{sid!r} holds fewer slots than tokens"

    # ------------------------------------------------------------------ one step
    def batch(self, chunks: Sequence[Tuple[Hashable, int]], packed: bool = True,
              in_place: bool = False):
        """The step for ``chunks`` = ``[(sid, n_new), ...]`` as the cache a model's forward uses.

        Takes the blocks the new tokens need.  ``packed=True``: all new tokens in one row
        ``(1, S)`` and all the sequences' keys one after another (prompt chunks: no padding of
        queries).  ``packed=False``: one row per sequence, ``(B, max n_new)`` queries and ``(B,
        longest history)`` keys, shorter rows padded with keys at a position no query reaches
        (decode steps: attention reads ``B x L`` keys, not ``B x B x L``).  With
        ``in_place=True``, a :class:`PagedBlocks` step instead, whose attention reads the blocks
        where they are (no gather; a paged-attention kernel: FlexAttention, or on a CPU
        ``transformer.cpu_attention``, which alone takes a packed one).  Call :meth:`commit` for
        each chunk after the forward.  Cost: O(keys read) host work for a few
        index tensors (``in_place``: O(blocks)).
        """
        if in_place:
            return self.blocks_step(chunks, packed=packed)
        bs, dev = self.block_size, self.pool.device
        as_t = lambda xs: torch.tensor(xs, dtype=torch.long, device=dev)  # noqa: E731
        starts = [self.length(sid) for sid, _ in chunks]
        writes = [self.slots(sid, n) for sid, n in chunks]  # host lists of S_i slots (takes blocks)
        ends = [st + n for st, (_, n) in zip(starts, chunks)]  # keys each sequence reads
        # Block tables as one (B, max blocks) tensor; the read slots follow by arithmetic on the
        # device (slot = table[p // bs] * bs + p % bs), not token by token on the host.
        width = max(-(-e // bs) for e in ends)
        tables = [self.seqs[sid].blocks[:width] for sid, _ in chunks]
        table = as_t([t + [0] * (width - len(t)) for t in tables])  # (B, width); padding reads block 0, masked
        slots = (table.unsqueeze(-1) * bs + torch.arange(bs, device=dev)).flatten(1)  # (B, width * bs)
        if packed:
            lengths = as_t(ends)
            keep = torch.arange(slots.shape[1], device=dev) < lengths.unsqueeze(1)  # (B, width * bs)
            kpos = torch.arange(slots.shape[1], device=dev).expand_as(slots)[keep]
            kseq = torch.arange(len(chunks), device=dev).unsqueeze(1).expand_as(slots)[keep]
            qpos = as_t([p for st, e in zip(starts, ends) for p in range(st, e)])
            qseq = as_t([i for i, w in enumerate(writes) for _ in w])
            step = PagedBatch(self.pool, as_t([[w for ws in writes for w in ws]]), slots[keep][None], kpos[None],
                              qpos[None], qseq[None], kseq[None])
            step.segments = [n for _, n in chunks], ends
            # Every sequence starts at position 0 (fresh prompts, no prefix hit): the keys it
            # reads are exactly the ones it writes, in the same order, so update need not gather.
            step.fresh = not any(starts)
            return step
        S, N = len(writes[0]), max(ends)
        if any(len(w) != S for w in writes):
            raise ValueError(f"packed=False needs the same number of new tokens per sequence, got "
                             f"{[n for _, n in chunks]}")
        far = torch.iinfo(torch.long).max  # a key position after every query: masked by causality
        kpos = torch.arange(N, device=dev).expand(len(chunks), N)
        kpos = kpos.masked_fill(kpos >= as_t(ends).unsqueeze(1), far)  # (B, N): padding after the last key
        qpos = as_t([list(range(st, e)) for st, e in zip(starts, ends)])
        return PagedBatch(self.pool, as_t(writes), slots[:, :N], kpos, qpos)


    def blocks_step(self, chunks: Sequence[Tuple[Hashable, int]], width: Optional[int] = None,
                    packed: bool = False) -> "PagedBlocks":
        """The step for ``chunks`` as a :class:`PagedBlocks`: attention reads each row's blocks
        in place.  Unpacked, ``n_new`` must be equal for all rows (``(B, n_new)`` queries);
        ``packed``: every new token in one ``(1, T)`` row, each knowing its block-table row
        (``query_rows``), for prompt chunks of any lengths.  ``width``: columns of the block
        table (default: the longest row's blocks; a fixed width keeps shapes fixed for CUDA
        graphs).  Takes the blocks the new tokens need.  Cost: O(blocks + new tokens) host work,
        a few small tensors."""
        dev = self.pool.device
        starts, writes, tables = self.plan(chunks, width)
        table = torch.tensor(tables, dtype=torch.int32, device=dev)
        if packed:
            qpos = [p for st, w in zip(starts, writes) for p in range(st, st + len(w))]
            rows = [i for i, w in enumerate(writes) for _ in w]
            as_t = lambda xs: torch.tensor([xs], dtype=torch.long, device=dev)  # noqa: E731
            return PagedBlocks(self.pool, as_t([x for w in writes for x in w]), table, as_t(qpos), as_t(rows))
        if any(len(w) != len(writes[0]) for w in writes):
            raise ValueError(f"a PagedBlocks step needs the same number of new tokens per sequence, got "
                             f"{[n for _, n in chunks]}")
        qpos = torch.tensor([list(range(st, st + len(w))) for st, w in zip(starts, writes)], device=dev)
        return PagedBlocks(self.pool, torch.tensor(writes, device=dev), table, qpos)

    def plan(self, chunks: Sequence[Tuple[Hashable, int]], width: Optional[int] = None):
        """Host lists for a step: ``(starts, write_slots, block_tables)``, each row's first new
        position, the slots of its new tokens, and its block table padded with ``-1`` to
        ``width`` columns (default: the longest).  Takes the blocks the new tokens need; a
        runner that keeps its own device buffers (CUDA graphs) copies these into them."""
        starts = [self.length(sid) for sid, _ in chunks]
        writes = [self.slots(sid, n) for sid, n in chunks]
        tables = [self.seqs[sid].blocks for sid, _ in chunks]
        width = max(len(t) for t in tables) if width is None else width
        if any(len(t) > width for t in tables):
            raise ValueError(f"width={width} is narrower than a block table of {max(len(t) for t in tables)} blocks")
        return starts, writes, [t + [-1] * (width - len(t)) for t in tables]


class PagedBatch:
    """One engine step as the model's forward pass sees it (the ``Cache`` questions).

    Built by :meth:`BlockManager.batch`.  Long tensors on the pool's device, ``B`` rows:
    ``write_slots`` ``(B, S)`` where the new tokens go, ``read_slots`` ``(B, N)`` the keys each
    row reads (its history, the new tokens included), ``positions`` ``(B, N)`` each key's
    position, ``query_positions`` ``(B, S)`` the new tokens' positions; for a packed step
    (``B = 1``, several sequences in the row) also ``query_seq`` ``(1, S)`` and ``key_seq`` ``(1,
    N)``, each token's sequence number.

    * ``update(key, value, layer_idx, cache_position)`` takes ``(B, S, H_kv, D)`` ("bshd"),
      writes it at ``write_slots`` and returns ``(B, N, H_kv, D)`` gathered at ``read_slots``;
    * ``key_positions(layer)`` is ``positions`` (one tensor for every layer: one mask);
    * ``retention_mask(q, k)``: packed, ``query_seq == key_seq`` per pair, ``(1, S, N)`` -- a
      query sees only its own sequence (the model ANDs causality by position in); else ``None``
      (padding keys sit at a position after every query, so causality hides them).

    Pass ``cache_position=query_positions`` to the model, so the mask is built and rotary or
    learned positions are right.  Cost per layer: one write of ``B * S`` tokens and one gather
    of ``B * N``; the mask is ``B x S x N`` booleans, once per step.
    """

    is_lossless = True
    positions_in_cache = False
    layout = "bshd"

    def __init__(self, pool: BlockPool, write_slots: Tensor, read_slots: Tensor, positions: Tensor,
                 query_positions: Tensor, query_seq: Optional[Tensor] = None, key_seq: Optional[Tensor] = None):
        self.pool, self.write_slots, self.read_slots = pool, write_slots, read_slots
        self.positions, self.query_positions = positions, query_positions
        self.query_seq, self.key_seq = query_seq, key_seq
        self.segments = None  # packed: (new tokens, keys) per sequence, host lists (see varlen)
        self._varlen = None
        self.fresh = False  # the keys read are the keys written, in order (no history): no gather
        self.scratch = None  # (2, N, H * D) gather buffer, shared by the layers (one allocation per step)
        self.mirror = None  # (RowBuffer, rows (T,), positions (T,)): also write the new keys there (RowBuffer.attach)

    def update(self, key: Tensor, value: Tensor, layer_idx: int,
               cache_position: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Write the step's ``(B, S, H_kv, D)`` keys/values; return ``(B, N, H_kv, D)`` each."""
        if key.shape[:2] != self.write_slots.shape:
            raise ValueError(f"this PagedBatch step takes keys of shape {tuple(self.write_slots.shape)} + (H_kv, D), "
                             f"got {tuple(key.shape)}")
        self.pool.write(layer_idx, self.write_slots.flatten(), key.flatten(0, 1), value.flatten(0, 1))
        if self.mirror is not None:
            buffer, rows, positions = self.mirror
            buffer.write(layer_idx, rows, positions, key.flatten(0, 1), value.flatten(0, 1))
        if self.fresh:
            return key, value
        slots = self.read_slots.flatten()
        if self.scratch is None or self.scratch.shape[1] < len(slots):
            self.scratch = self.pool.storage.new_empty(2, len(slots), self.pool.num_kv_heads * self.pool.head_dim)
        k, v = self.pool.read(layer_idx, slots, out=self.scratch)
        return k.view(*self.read_slots.shape, *k.shape[1:]), v.view(*self.read_slots.shape, *v.shape[1:])

    def key_positions(self, layer_idx: int, in_cache: bool = False) -> Tensor:
        """``(B, N)`` position of each key inside its own sequence."""
        return self.positions

    def varlen(self) -> Optional[Tuple[Tensor, Tensor, int, int]]:
        """Packed: the same block-diagonal causal mask in compressed form, as variable-length
        attention kernels take it: ``(cu_seq_q, cu_seq_k, max_q, max_k)``, int32 cumulative
        query and key counts per sequence ``(n_seq + 1,)`` and the longest of each.  Sequence
        ``i``'s queries are the *last* ``n_i`` of its keys (causal aligned bottom-right).  ``None``
        for an unpacked step."""
        if self.segments is None:
            return None
        if self._varlen is None:
            new, ends = self.segments
            cum = lambda xs: torch.tensor([0] + xs, dtype=torch.int32).cumsum(0, dtype=torch.int32)  # noqa: E731
            dev = self.write_slots.device
            self._varlen = cum(new).to(dev), cum(ends).to(dev), max(new), max(ends)
        return self._varlen

    def retention_mask(self, query_positions: Tensor, key_positions: Tensor) -> Optional[Tensor]:
        """Packed: ``(1, S, N)``, may query ``i`` see key ``j`` at all (same sequence); else ``None``."""
        if self.query_seq is None:
            return None
        return self.query_seq.unsqueeze(-1) == self.key_seq.unsqueeze(-2)

    def rotary_offsets(self, layer_idx: int) -> None:
        """``None``: keys are rotated at their position before :meth:`update`."""
        return None

    def get_max_cache_shape(self) -> int:
        """Keys a row reads, ``N``."""
        return self.read_slots.shape[-1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise ValueError("a PagedBatch holds many sequences and has no single length; pass cache_position "
                         "(its query_positions) to the model")


class PagedBlocks:
    """One engine step whose attention reads every row's blocks **where they are** (no gather).

    Built by :meth:`BlockManager.blocks_step`.  ``B`` rows of ``S`` new tokens each:
    ``write_slots`` ``(B, S)`` where the new tokens go, ``block_table`` ``(B, W)`` int32 or int64, the
    pool blocks each row reads, in order (``-1`` after its last block), ``query_positions``
    ``(B, S)``.  Block ``block_table[b, j]`` holds row ``b``'s positions ``j * bs .. j * bs +
    bs - 1``: that is the whole answer to "which position does each key hold", so nothing per
    key is stored or copied.  A *packed* step (prompt chunks of different lengths) is one row
    ``(1, T)`` whose ``query_rows`` ``(1, T)`` says which block-table row each token reads
    (the CPU kernel's form; FlexAttention's block mask has no such rows).

    * ``update(key, value, layer_idx, cache_position)`` takes ``(B, S, H_kv, D)``, writes it at
      ``write_slots`` and returns the layer's *whole pool* as ``(1, slots, H_kv, D)`` views
      (keys, values): no copy.  Attention must then read only each row's blocks, which the
      model's mask builder arranges from :meth:`key_blocks` (a FlexAttention block mask whose
      block-sparse rows *are* the block tables);
    * ``key_blocks()`` returns ``(block_table, block_size, num_pool_blocks)``;
    * ``key_positions(layer)`` is ``None``: positions follow from the table, per row.

    The same keys the gathering :class:`PagedBatch` would hand over, read in place: cost per
    layer one write of ``B * S`` tokens, and attention touches only the rows' own blocks.
    """

    is_lossless = True
    positions_in_cache = False
    layout = "bshd"

    def __init__(self, pool: BlockPool, write_slots: Tensor, block_table: Tensor, query_positions: Tensor,
                 query_rows: Optional[Tensor] = None):
        self.pool, self.write_slots, self.block_table = pool, write_slots, block_table
        self.query_positions, self.query_rows = query_positions, query_rows

    def update(self, key: Tensor, value: Tensor, layer_idx: int,
               cache_position: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Write the step's ``(B, S, H_kv, D)`` keys/values; return the pool's ``(1, slots, H_kv, D)`` each."""
        if key.shape[:2] != self.write_slots.shape:
            raise ValueError(f"this PagedBlocks step takes keys of shape {tuple(self.write_slots.shape)} + (H_kv, D), "
                             f"got {tuple(key.shape)}")
        slots = self.write_slots.flatten()
        # index_copy_ returns the written storage: reading *that* keeps the write before the read
        # under torch.compile too (a fresh view of the pool can be read before the write lands)
        k = self.pool.slot_view(0, layer_idx).index_copy_(0, slots, key.flatten(0, 1))
        v = self.pool.slot_view(1, layer_idx).index_copy_(0, slots, value.flatten(0, 1))
        return k[None], v[None]

    def key_blocks(self) -> Tuple[Tensor, int, int]:
        """``(block_table (B, W) int32, block_size, blocks in the pool)``: what each row reads."""
        return self.block_table, self.pool.block_size, self.pool.capacity

    def key_positions(self, layer_idx: int, in_cache: bool = False) -> None:
        """``None``: each key's position follows from :meth:`key_blocks` (block ``j`` of a row
        holds positions ``j * bs ..``)."""
        return None

    def retention_mask(self, query_positions: Tensor, key_positions) -> None:
        """``None``: a row reads only its own blocks (the block table says which)."""
        return None

    def rotary_offsets(self, layer_idx: int) -> None:
        """``None``: keys are rotated at their position before :meth:`update`."""
        return None

    def get_max_cache_shape(self) -> int:
        """Slots in the pool (the key axis attention is given)."""
        return self.pool.capacity * self.pool.block_size

    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise ValueError("a PagedBlocks step holds many sequences and has no single length; pass cache_position "
                         "(its query_positions) to the model")
