"""``RowBuffer`` and ``RowsStep``: decode steps that read dense rows, for a CPU serving engine.

A paged pool keeps a sequence's keys in blocks scattered over the storage.  On a GPU attention
reads them where they are (a paged-attention kernel: FlexAttention with the block tables as its
sparse rows).  A CPU has no such kernel in PyTorch: FlexAttention's CPU path scores every slot of
the pool, and gathering each row's blocks into a padded batch before ``scaled_dot_product_attention``
copies the whole history of every running request, layer by layer, every step -- on this
project's 2-core test machine that copy was 30% of a decode step, and SDPA over the gathered
``(B, N, H, D)`` view was slower than over a ``(B, H, N, D)`` one.

The engine's CPU default reads the blocks in place with a small C kernel
(``transformer/cpu_attention.py``; this package knows no model, so it lives there).  Where no C
compiler builds it, the CPU engine keeps a **second, dense copy** of the keys it is serving: a
:class:`RowBuffer` of ``rows x max_len`` tokens per layer, laid out ``(rows, H_kv, max_len, D)``
like a static batch's cache.  Each running request owns one row while it runs; every key is
written twice (its pool slot and its row: two tiny copies per layer), and a decode step over
rows ``0 .. R-1`` hands attention the slice ``[:R, :, :N]`` -- no copy at all.  A row's keys after
its length are stale (a former owner's) and sit at positions after its query, so causality by
position hides them: the mask is the model's ordinary one.

The pool stays the memory of record: block tables, prefix caching, preemption and the memory
limit are all its, and a request that starts from cached prefix blocks has them copied into its
row once (:meth:`RowBuffer.sync`).  The price is memory: the buffer holds
``2 * layers * rows * H_kv * max_len * D`` elements on top of the pool (the default model's
shape, 4 layers x 256 channels: 32 rows, the server's default, of 256 tokens = 64 MiB in
float32; 64 rows = 128 MiB), the reservation by maximum length that paging avoids --
which is why this is the CPU's choice (memory is plentiful, bandwidth is not) and not the GPU's.
This module knows no model.
"""

from __future__ import annotations

from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import torch

from .block_manager import BlockManager

Tensor = torch.Tensor


class RowBuffer:
    """Dense per-request copies of a :class:`BlockManager`'s keys and values, one row each.

    Args:
        blocks: the block manager whose sequences the rows mirror (its pool gives layers,
            heads, head size, dtype and device).
        rows: how many sequences can own a row at once (the engine's ``max_num_seqs``).
        max_len: tokens per row (the model's ``max_seq_len``).

    ``storage`` is ``(2, layers, rows, H_kv, max_len, D)``: keys then values.  Rows are handed
    out lowest first (:meth:`assign`) and kept packed at the bottom (:meth:`compact`, at every
    step), so a decode step over rows ``0 .. R-1`` pads few rows.  A row is taken back lazily:
    when its sequence has left the block manager (finished, aborted, preempted), the next step
    reclaims it.  Host cost per step: a scan of the rows.
    """

    def __init__(self, blocks: BlockManager, rows: int, max_len: int):
        for name, v in (("rows", rows), ("max_len", max_len)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        pool = blocks.pool
        self.blocks, self.rows, self.max_len = blocks, rows, max_len
        self.storage = pool.storage.new_zeros(2, pool.num_layers, rows, pool.num_kv_heads, max_len, pool.head_dim)
        self.owner: List[Optional[Tuple[Hashable, object]]] = [None] * rows  # (sid, its SequenceState)
        self.filled = [0] * rows  # positions 0 .. filled-1 of the row hold its sequence's keys
        self.row_of: Dict[Hashable, int] = {}

    @property
    def nbytes(self) -> int:
        """Memory the buffer holds, in bytes (on top of the pool)."""
        return self.storage.numel() * self.storage.element_size()

    def assign(self, sid: Hashable) -> int:
        """The row of sequence ``sid`` (which must be in the block manager), taking the lowest
        free one the first time.  A sequence that was preempted and came back (a new
        ``SequenceState``) gets an empty row again."""
        seq = self.blocks.seqs[sid]
        r = self.row_of.get(sid)
        if r is not None and self.owner[r][1] is seq:
            return r
        if r is not None:  # the same id, a new life: its old row's keys are not its keys any more
            self.owner[r], self.filled[r] = None, 0
            del self.row_of[sid]
        free = [i for i, o in enumerate(self.owner) if o is None]
        if not free:
            self._reclaim()
            free = [i for i, o in enumerate(self.owner) if o is None]
            if not free:
                raise RuntimeError(f"all {self.rows} rows are owned by running sequences; the engine runs at most "
                                   f"rows={self.rows} sequences at once")
        r = free[0]
        self.owner[r], self.filled[r], self.row_of[sid] = (sid, seq), 0, r
        return r

    def _reclaim(self) -> None:
        """Free the rows whose sequence left the block manager (or came back as a new one)."""
        for r, o in enumerate(self.owner):
            if o is not None and self.blocks.seqs.get(o[0]) is not o[1]:
                self.owner[r], self.filled[r] = None, 0
                del self.row_of[o[0]]

    def compact(self) -> None:
        """Take back the rows of sequences that left, and move the highest rows in use down into
        the holes, so that the rows in use are ``0 .. k-1``: a decode step then runs no padding
        rows but those of prompts still being read (without it, a few requests left in high rows
        at the end of a burst would make every step run all the rows below them).  Cost: one
        copy of each moved row's ``filled`` tokens, every layer."""
        self._reclaim()
        free = [r for r, o in enumerate(self.owner) if o is None]
        used = [r for r, o in enumerate(self.owner) if o is not None]
        while free and used and free[0] < used[-1]:
            dst, src = free.pop(0), used.pop()
            n = self.filled[src]
            if n:
                self.storage[:, :, dst, :, :n] = self.storage[:, :, src, :, :n]
            self.owner[dst], self.filled[dst] = self.owner[src], n
            self.row_of[self.owner[dst][0]] = dst
            self.owner[src], self.filled[src] = None, 0

    def _check_fits(self, sid: Hashable, end: int) -> None:
        if end > self.max_len:
            raise ValueError(f"sequence {sid!r} would hold {end} tokens; a row holds max_len={self.max_len}")

    def sync(self, sid: Hashable, upto: int) -> None:
        """Make row ``sid``'s positions ``0 .. upto-1`` hold the sequence's keys, copying the
        missing ones from the pool (blocks revived from the prefix cache, which no step of this
        row computed).  One gather of the missing tokens per layer; nothing when up to date."""
        r = self.assign(sid)
        start = self.filled[r]
        if start >= upto:
            return
        pool, bs = self.blocks.pool, self.blocks.block_size
        table = self.blocks.seqs[sid].blocks
        slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(start, upto)], device=self.storage.device)
        for layer in range(pool.num_layers):
            k, v = pool.read(layer, slots)  # (n, H, D) each
            self.storage[0, layer, r, :, start:upto] = k.transpose(0, 1)
            self.storage[1, layer, r, :, start:upto] = v.transpose(0, 1)
        self.filled[r] = upto

    def advance(self, sid: Hashable, upto: int) -> None:
        """Record that a step wrote ``sid``'s keys up to position ``upto - 1`` (after the step)."""
        r = self.row_of[sid]
        self.filled[r] = max(self.filled[r], upto)

    def write(self, layer: int, rows: Tensor, positions: Tensor, key: Tensor, value: Tensor) -> None:
        """Store ``key``/``value`` ``(T, H_kv, D)`` at ``(rows[t], positions[t])`` of ``layer``
        (``rows``, ``positions``: ``(T,)`` long).  One indexed copy of ``T`` tokens each."""
        self.storage[0, layer][rows, :, positions] = key
        self.storage[1, layer][rows, :, positions] = value

    def attach(self, batch, chunks: Sequence[Tuple[Hashable, int]]) -> None:
        """Make a packed prompt step (a :class:`~kv_cache.paged.block_manager.PagedBatch` built
        for ``chunks`` = ``[(sid, n_new), ...]``) write its new keys into the rows too, after
        syncing each row up to the chunk's start.  Call :meth:`advance` for each after the forward."""
        self.compact()
        rows, positions = [], []
        for sid, n in chunks:
            start = self.blocks.length(sid)
            self._check_fits(sid, start + n)
            self.sync(sid, start)
            rows += [self.row_of[sid]] * n
            positions += range(start, start + n)
        dev = self.storage.device
        batch.mirror = (self, torch.tensor(rows, device=dev), torch.tensor(positions, device=dev))

    def step(self, chunks: Sequence[Tuple[Hashable, int]]) -> "RowsStep":
        """A decode step, one new token for each ``(sid, 1)`` of ``chunks``, as the cache the
        model's forward uses.  Takes the blocks the new tokens need (their pool slots), syncs
        each row, and lays the step over rows ``0 .. R-1`` (``R`` = the highest row in it + 1):
        the model runs ``R`` rows, the ones not in ``chunks`` as padding.  Call :meth:`advance`
        (and the block manager's ``commit``) for each after the forward."""
        if any(n != 1 for _, n in chunks):
            raise ValueError(f"a RowsStep decodes one token per sequence, got {[n for _, n in chunks]}")
        self.compact()
        starts = [self.blocks.length(sid) for sid, _ in chunks]
        for (sid, _), st in zip(chunks, starts):
            self._check_fits(sid, st + 1)
            self.sync(sid, st)
        rows = [self.row_of[sid] for sid, _ in chunks]
        writes = [self.blocks.slots(sid, 1)[0] for sid, _ in chunks]
        return RowsStep(self, rows, starts, writes)


class RowsStep:
    """One decode step over rows of a :class:`RowBuffer` (the ``Cache`` questions).

    Built by :meth:`RowBuffer.step` for ``B`` sequences in rows ``rows``, new tokens at
    ``positions``, pool slots ``write_slots``.  The model runs ``R = max(rows) + 1`` query rows
    (``(R, 1)`` ids; row ``r`` of the batch *is* buffer row ``r``): :attr:`query_positions` is
    ``(R, 1)``, the sequences' positions in their rows and ``0`` for padding rows, whose outputs
    the caller drops (:attr:`index`: where each sequence's output is).

    * ``update(key, value, layer_idx)`` takes ``(R, H_kv, 1, D)`` ("bhsd"), writes the ``B`` real
      rows' keys into their pool slots and their buffer rows, and returns the buffer's
      ``(R, H_kv, N, D)`` views, ``N`` = the longest row's length: no copy;
    * ``key_positions`` is ``arange(N)``: every row's key ``j`` is at position ``j``, and the
      keys past a row's own length (stale, or padding) are after its query, so the model's
      causal mask hides them.

    Cost per layer: two copies of ``B`` tokens; attention reads ``R x N`` keys in place.
    """

    is_lossless = True
    positions_in_cache = False
    layout = "bhsd"

    def __init__(self, buffer: RowBuffer, rows: List[int], positions: List[int], write_slots: List[int]):
        dev = buffer.storage.device
        self.buffer, self.pool = buffer, buffer.blocks.pool
        self.R, self.N = max(rows) + 1, max(positions) + 1
        qpos = [0] * self.R
        for r, p in zip(rows, positions):
            qpos[r] = p
        self.query_positions = torch.tensor(qpos, device=dev).unsqueeze(-1)  # (R, 1)
        self.dense = rows == list(range(self.R))  # every batch row is a sequence, in order
        self.row_list, self.rows = rows, torch.tensor(rows, device=dev)
        self.num_sequences = len(rows)  # B: the rest of the R batch rows are padding
        self.index = self.rows  # (B,) the batch row of each sequence
        self.positions = torch.tensor(positions, device=dev)
        self.write_slots = torch.tensor(write_slots, device=dev)
        self._key_positions = torch.arange(self.N, device=dev)

    def update(self, key: Tensor, value: Tensor, layer_idx: int,
               cache_position: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Write the step's ``(R, H_kv, 1, D)`` keys/values; return the rows' ``(R, H_kv, N, D)`` each."""
        if key.shape[0] != self.R or key.shape[2] != 1:
            raise ValueError(f"this RowsStep takes keys of shape ({self.R}, H_kv, 1, D), got {tuple(key.shape)}")
        k, v = key[:, :, 0], value[:, :, 0]  # (R, H, D)
        if not self.dense:
            k, v = k.index_select(0, self.rows), v.index_select(0, self.rows)
        self.pool.write(layer_idx, self.write_slots, k, v)
        self.buffer.write(layer_idx, self.rows, self.positions, k, v)
        store = self.buffer.storage
        return store[0, layer_idx, :self.R, :, :self.N], store[1, layer_idx, :self.R, :, :self.N]

    def key_positions(self, layer_idx: int, in_cache: bool = False) -> Tensor:
        """``(N,)``: key ``j`` of every row holds position ``j``."""
        return self._key_positions

    def retention_mask(self, query_positions: Tensor, key_positions: Tensor) -> None:
        """``None``: causality by position hides every key a row does not hold."""
        return None

    def rotary_offsets(self, layer_idx: int) -> None:
        """``None``: keys are rotated at their position before :meth:`update`."""
        return None

    def get_max_cache_shape(self) -> int:
        """Keys a row reads, ``N``."""
        return self.N

    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise ValueError("a RowsStep holds many sequences and has no single length; pass cache_position "
                         "(its query_positions) to the model")
