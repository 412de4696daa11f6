"""``ModelRunner``: how the engine's steps reach the model (nano-vllm's model runner).

The scheduler says *who* runs; the runner turns that into calls of the model's one forward
pass and owns everything about running it fast, none of the maths:

* **prompt chunks** (prefill): packed into one ``(1, S)`` row (no padded queries).  With the
  CPU kernel (``"paged"`` on a CPU) a packed :class:`~kv_cache.paged.block_manager.PagedBlocks`
  step, each token reading its own sequence's blocks in place; otherwise a gathering
  :class:`~kv_cache.paged.block_manager.PagedBatch` (a block-diagonal causal mask; a chunk's
  keys are copied once per step, small next to its matrix work);
* **decode tokens**: a ``(B, 1)`` batch.  Three ways to read the history, chosen by
  ``attention``:

  - ``"gather"``: each layer copies every row's history into a padded ``(B, N)`` batch
    (``index_select``) and runs ``scaled_dot_product_attention``: no memory beyond the pool;
  - ``"rows"``: each running request also owns a row of a dense
    :class:`~kv_cache.paged.rows.RowBuffer` (``(max_num_seqs, H, max_seq_len, D)`` per layer,
    a static batch's cache layout); every key is written to its pool slot *and* its row, and a
    decode step hands attention the rows in place.  No per-step copy, at the price of that
    buffer's memory on top of the pool, and SDPA reads every row to the step's longest
    history.  The CPU default where no compiler builds the kernel (``docs/serving.md``);
  - ``"paged"``: a :class:`~kv_cache.paged.block_manager.PagedBlocks` step; attention reads
    each row's blocks where they are in the pool (no copy of the history): on a GPU through a
    FlexAttention block mask whose sparse rows *are* the block tables, on a CPU through the C
    kernel of :mod:`transformer.cpu_attention` (each query reads exactly its own keys; the
    fastest path measured on a CPU and its default where a C compiler works).  Decode is
    bound by reading the keys, and a gather reads them twice and writes them once more;

* **CUDA graphs** (``cuda_graph``, with ``"paged"`` on a GPU): a decode step of ``B`` rows
  replays a graph recorded for the smallest bucket ``>= B`` (1, 2, 4, 8, ...).  The inputs
  live in fixed buffers the graph reads (token ids, positions, write slots, block tables);
  rows past ``B`` are padding that write to a block the runner holds for them and attend to
  it alone.  A step is then one graph launch instead of ~15 kernel launches per layer.

Cost of a decode step on the host: O(rows + their blocks) Python work to fill the buffers.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from kv_cache.paged.block_manager import BlockManager, PagedBlocks
from kv_cache.paged.rows import RowBuffer

from .. import cpu_attention

PAD_SEQ = "<cuda-graph padding>"  # the block manager's name for the runner's padding block


class ModelRunner:
    """Run prompt chunks and decode batches of the engine through the model.

    Args:
        model: the decoder-only model (its device and dtype are the pool's).
        blocks: the engine's :class:`~kv_cache.paged.block_manager.BlockManager`.
        attention: ``"auto"`` (``"paged"``: on a CPU where the C kernel builds, else ``"rows"``
            where its buffer fits, :meth:`rows_fit`, else ``"gather"``), ``"paged"``, ``"rows"``
            or ``"gather"``; see the module docstring.
        cuda_graph: replay decode steps as CUDA graphs (default: on for ``"paged"`` on CUDA).
        max_num_seqs: largest decode batch (the largest graph bucket).
    """

    def __init__(self, model, blocks: BlockManager, *, attention: str = "auto", cuda_graph: Optional[bool] = None,
                 max_num_seqs: int = 32):
        dev = blocks.pool.device
        if attention not in ("auto", "paged", "rows", "gather"):
            raise ValueError(f"attention must be 'auto', 'paged', 'rows' or 'gather', got {attention!r}")
        small_heads = model.config.head_dim < 16  # FlexAttention's GPU kernels need head_dim >= 16
        kernel = cpu_attention.available(dev, blocks.pool.dtype)  # the CPU paged-attention kernel
        if attention == "auto":
            attention = ("paged" if not small_heads else "gather") if dev.type == "cuda" else "paged" if kernel \
                else "rows" if self.rows_fit(model, blocks, max_num_seqs) else "gather"
        if attention == "paged" and dev.type == "cuda" and small_heads:
            raise ValueError(f"attention='paged' on CUDA needs head_dim >= 16 (FlexAttention's kernels), this model "
                             f"has head_dim={model.config.head_dim}; use attention='gather'")
        if cuda_graph is None:
            cuda_graph = dev.type == "cuda" and attention == "paged"
        if cuda_graph and (dev.type != "cuda" or attention != "paged"):
            raise ValueError(f"cuda_graph=True needs attention='paged' on a CUDA device; got attention={attention!r} "
                             f"on {dev}")
        self.model, self.blocks, self.attention, self.cuda_graph = model, blocks, attention, cuda_graph
        self.device = dev
        self.packed_in_place = attention == "paged" and kernel  # prompt chunks read in place too (CPU kernel)
        self.graphs: Dict[int, Tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.rows = RowBuffer(blocks, max_num_seqs, model.config.max_seq_len) if attention == "rows" else None
        if cuda_graph:
            self._init_graph_buffers(max_num_seqs)

    #: ``attention="auto"`` on a CPU takes ``"rows"`` while the row buffer is at most this many
    #: bytes, or no larger than the pool: the buffer reserves every row's maximum length, which
    #: for a long-context model (a 128K-token Llama) would be far more than the pool itself.
    ROWS_AUTO_BYTES = 256 * 2 ** 20

    @staticmethod
    def rows_bytes(model, max_num_seqs: int, itemsize: int) -> int:
        """Bytes of the ``attention="rows"`` buffer: keys and values of ``max_num_seqs`` rows of
        ``max_seq_len`` tokens, every layer."""
        cfg = model.config
        return 2 * cfg.n_layers * max_num_seqs * cfg.n_kv_heads * cfg.max_seq_len * cfg.head_dim * itemsize

    @classmethod
    def rows_fit(cls, model, blocks: BlockManager, max_num_seqs: int) -> bool:
        """Does ``"auto"`` pick ``"rows"`` on a CPU: is its buffer at most :attr:`ROWS_AUTO_BYTES`
        or no larger than the pool (``num_blocks`` blocks)?"""
        pool = blocks.pool
        need = cls.rows_bytes(model, max_num_seqs, pool.storage.element_size())
        pool_bytes = 2 * pool.num_layers * pool.max_blocks * pool.block_size * pool.num_kv_heads * pool.head_dim \
            * pool.storage.element_size()
        return need <= max(cls.ROWS_AUTO_BYTES, pool_bytes)

    # ------------------------------------------------------------------ prefill
    def prefill(self, chunks: Sequence[Tuple[object, int]]) -> torch.Tensor:
        """Logits ``(len(chunks), V)`` at the last new token of each prompt chunk, one forward."""
        batch = self.blocks.batch([(r.request_id, n) for r, n in chunks], packed=True, in_place=self.packed_in_place)
        ids, last = [], []
        for r, n in chunks:
            ids += r.tokens(r.num_computed, r.num_computed + n)
            last.append(len(ids) - 1)
        dev = self.device
        if self.rows is not None:  # the new keys go to the requests' rows too
            self.rows.attach(batch, [(r.request_id, n) for r, n in chunks])
        logits = self.model(torch.tensor([ids], device=dev), cache=batch, cache_position=batch.query_positions,
                            num_logits_to_keep=torch.tensor(last, device=dev))[0]  # (len(chunks), V)
        if self.rows is not None:
            for r, n in chunks:
                self.rows.advance(r.request_id, r.num_computed + n)
        return logits

    # ------------------------------------------------------------------ decode
    def decode(self, chunks: Sequence[Tuple[object, int]], pending: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``(len(chunks), V)`` of one new token per request.

        A request whose newest token is still *pending* (sampled by the step before, its value
        not yet read back: the engine overlaps host work with the GPU) takes its input id from
        ``pending``, that step's ``(k,)`` device tokens, at row ``request.pending_row``: the
        step's ids are completed on the device, with no wait."""
        if self.cuda_graph and len(chunks) <= self.buckets[-1]:
            return self._replay(chunks, pending)
        if self.rows is not None:
            return self._decode_rows(chunks, pending)
        sids = [(r.request_id, 1) for r, _ in chunks]
        batch = self.blocks.batch(sids, packed=False, in_place=self.attention == "paged")
        ids, src = self._ids([r for r, _ in chunks])
        ids = torch.tensor(ids, device=self.device).unsqueeze(-1)  # (B, 1)
        if any(i >= 0 for i in src):
            ids = self._fill_pending(ids, torch.tensor(src, device=self.device).unsqueeze(-1), pending)
        return self.model(ids, cache=batch, cache_position=batch.query_positions)[:, -1]  # (B, V)

    def _decode_rows(self, chunks: Sequence[Tuple[object, int]], pending: Optional[torch.Tensor]) -> torch.Tensor:
        """A decode step over the rows of :attr:`rows` (``attention="rows"``): the model runs
        rows ``0 .. R-1`` of the buffer, padding rows among them, and the requests' logits are
        picked out in ``chunks`` order."""
        reqs = [r for r, _ in chunks]
        step = self.rows.step([(r.request_id, 1) for r in reqs])
        ids, src = self._ids(reqs)
        row_ids, row_src = [0] * step.R, [-1] * step.R  # padding rows: token 0, at position 0
        for row, i, j in zip(step.row_list, ids, src):
            row_ids[row], row_src[row] = i, j
        ids_t = torch.tensor(row_ids, device=self.device).unsqueeze(-1)  # (R, 1)
        if any(j >= 0 for j in src):
            ids_t = self._fill_pending(ids_t, torch.tensor(row_src, device=self.device).unsqueeze(-1), pending)
        logits = self.model(ids_t, cache=step, cache_position=step.query_positions)[:, -1]  # (R, V)
        for r in reqs:
            self.rows.advance(r.request_id, r.num_computed + 1)
        return logits if step.dense else logits.index_select(0, step.index)  # (B, V)

    @staticmethod
    def _ids(requests) -> Tuple[List[int], List[int]]:
        """Host input ids of a decode step (``0`` where pending) and, per row, the row of the
        pending token in the previous step's tokens (``-1``: the id is known)."""
        ids, src = [], []
        for r in requests:
            t = r.token(r.num_computed)
            ids.append(0 if t is None else t)
            src.append(r.pending_row if t is None else -1)
        return ids, src

    @staticmethod
    def _fill_pending(ids: torch.Tensor, src: torch.Tensor, pending: Optional[torch.Tensor]) -> torch.Tensor:
        """``ids`` ``(B, 1)`` with the rows where ``src >= 0`` replaced by ``pending[src]`` (device ops)."""
        if pending is None:
            raise ValueError("a decode row waits for a pending token but no pending tokens were given")
        taken = pending.index_select(0, src.clamp(min=0).flatten()).view_as(ids)
        return torch.where(src >= 0, taken, ids)

    # ------------------------------------------------------------------ CUDA graphs
    def _init_graph_buffers(self, max_num_seqs: int) -> None:
        """Fixed input buffers for every bucket (a graph reads their addresses), and one block
        held for padding rows to write to."""
        bs, cfg = self.blocks.block_size, self.model.config
        self.buckets = [1 << i for i in range((max_num_seqs - 1).bit_length())] + [max_num_seqs]
        self.buckets = sorted(set(b for b in self.buckets if b <= max_num_seqs))
        self.width = -(-cfg.max_seq_len // bs)  # block-table columns: the longest sequence's blocks
        self.blocks.allocate(PAD_SEQ, [])
        self.pad_slot = self.blocks.slots(PAD_SEQ, 1)[0]
        # One (rows, 4 + width) buffer holds every input, so a step is one host-to-device copy:
        # columns token id, position, write slot, pending row (-1: none; see decode), then the
        # block table (-1 after the last block).
        self.pad_row = [0, 0, self.pad_slot, -1, self.pad_slot // bs] + [-1] * (self.width - 1)
        self.inputs = torch.tensor([self.pad_row] * self.buckets[-1], dtype=torch.long, device=self.device)
        self.ids, self.pos, self.write = self.inputs[:, 0:1], self.inputs[:, 1:2], self.inputs[:, 2:3]
        self.src, self.table = self.inputs[:, 3:4], self.inputs[:, 4:]
        # Two pinned host copies of that buffer, used in turn: with async scheduling the host
        # fills step N + 1's while step N's copy may still be in flight (the engine has waited
        # for step N - 1, so the other one is free).  numpy views fill them without Python lists.
        self._host = [torch.tensor([self.pad_row] * self.buckets[-1], dtype=torch.long).pin_memory() for _ in (0, 1)]
        self._host_np = [h.numpy() for h in self._host]
        self._turn = 0
        self._rows: Dict[str, tuple] = {}  # request -> (blocks, last block, table row, state): see _table_row
        self._pool = None

    def _bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _stage(self, chunks: Sequence[Tuple[object, int]], Bp: int, pending: Optional[torch.Tensor] = None) -> None:
        """Fill the first ``Bp`` rows of the graph's buffers: the ``B`` requests, then padding;
        then the pending ids from ``pending`` (on the device, see :meth:`decode`).  Host cost:
        O(B) Python for ids, positions and write slots (taking new blocks); the block-table rows
        are cached per request and copied as one numpy array."""
        reqs = [r for r, _ in chunks]
        B, slots = len(reqs), self.blocks.slots
        ids, src = self._ids(reqs)
        buf, host = self._host_np[self._turn], self._host[self._turn]
        self._turn ^= 1
        buf[:B, 0], buf[:B, 3] = ids, src
        buf[:B, 1] = [r.num_computed for r in reqs]  # the new token's position (= tokens in the pool)
        buf[:B, 2] = [slots(r.request_id, 1)[0] for r in reqs]  # takes a block at a boundary
        buf[:B, 4:] = np.stack([self._table_row(r.request_id) for r in reqs]) if reqs else buf[:0, 4:]
        buf[B:Bp] = self.pad_row
        self.inputs[:Bp].copy_(host[:Bp], non_blocking=True)
        if any(j >= 0 for j in src):
            self.ids[:Bp].copy_(self._fill_pending(self.ids[:Bp], self.src[:Bp], pending))

    def _table_row(self, sid: str) -> np.ndarray:
        """``sid``'s block table padded with ``-1`` to ``width`` columns, rebuilt only when it
        changed.  A table changes only at its end (a new block, or a copy on write of the block
        being written, which is the last), so its length and last block identify it (with the
        sequence's state object: a preempted request returns with a new one)."""
        seq = self.blocks.seqs[sid]
        blocks = seq.blocks
        cached = self._rows.get(sid)  # (a preempted request comes back with a new SequenceState)
        if cached is None or cached[3] is not seq or cached[0] != len(blocks) or cached[1] != blocks[-1]:
            if len(self._rows) > 4 * self.buckets[-1]:  # forget requests that left
                self._rows = {k: v for k, v in self._rows.items() if k in self.blocks.seqs}
            row = np.full(self.width, -1, dtype=np.int64)
            row[:len(blocks)] = blocks
            cached = self._rows[sid] = (len(blocks), blocks[-1], row, seq)
        return cached[2]

    def _body(self, Bp: int) -> torch.Tensor:
        """The decode step of ``Bp`` rows over the fixed buffers: the model's one forward."""
        cache = PagedBlocks(self.blocks.pool, self.write[:Bp], self.table[:Bp], self.pos[:Bp])
        return self.model(self.ids[:Bp], cache=cache, cache_position=self.pos[:Bp])[:, -1]  # (Bp, V)

    def capture(self, Bp: int) -> None:
        """Record the decode graph of bucket ``Bp`` (after warm-up runs that compile the
        attention kernel for this shape).  Warm-up and capture write only the padding block."""
        self._stage([], Bp)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):
                self._body(Bp)
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self._pool):
            out = self._body(Bp)
        self.graphs[Bp] = graph, out

    def capture_all(self) -> None:
        """Record every bucket's graph now (a server does this before taking requests)."""
        for Bp in self.buckets:
            if Bp not in self.graphs:
                self.capture(Bp)

    def _replay(self, chunks: Sequence[Tuple[object, int]], pending: Optional[torch.Tensor] = None) -> torch.Tensor:
        Bp = self._bucket(len(chunks))
        if Bp not in self.graphs:
            self.capture(Bp)
        self._stage(chunks, Bp, pending)
        graph, out = self.graphs[Bp]
        graph.replay()
        return out[:len(chunks)]

    def held_sequences(self) -> List[str]:
        """Block-manager sequences the runner itself holds (the padding block), not requests."""
        return [PAD_SEQ] if self.cuda_graph else []
