"""The scheduler: which requests run in the next step, and how many of their tokens.

Continuous batching (Orca, vLLM) decides *every step*, not once per batch: a request that
finished leaves at once and a waiting one takes its place, so no row of the batch idles while
the longest request of a static batch finishes.  Each step has a **token budget**
(``max_num_batched_tokens``) and a cap on sequences (``max_num_seqs``):

1. running requests first, oldest first: one token each when decoding, or the next chunk of a
   prompt still being prefilled (chunked prefill: a long prompt takes several steps, so the
   requests that are decoding keep getting a token every step);
2. then waiting requests, first come first served, while budget, sequence slots and free
   blocks last.  A new request's prompt is first matched against the prefix cache: full blocks
   computed for an earlier prompt are shared and skipped.

Memory.  A running request that needs a new block when none is free **preempts** the most
recently admitted running request (possibly itself): its blocks are freed and it goes back to
the front of the queue, to be recomputed from prompt + generated tokens later (vLLM's
"recompute" mode).  Its tokens are kept, so it returns exactly what it would have; the pool's
budget is never exceeded.  Cost: O(requests + blocks touched) host work per step.
"""

from __future__ import annotations

from collections import deque
from typing import Deque, List, Tuple

from kv_cache.paged.block_manager import BlockManager

from .request import Request, Status


class Scheduler:
    """Waiting queue + running list over a :class:`~kv_cache.paged.block_manager.BlockManager`.

    Args:
        blocks: the memory.
        max_num_seqs: most requests in one step.
        max_num_batched_tokens: most tokens in one step (decode tokens + prefill chunks).
    """

    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: Deque[Request] = deque()
        self.running: List[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> List[Tuple[Request, int]]:
        """The next step: ``[(request, tokens to compute), ...]`` (running ones first).  Takes
        the blocks the step needs (so the caller must run it).  Empty only if nothing waits or
        the first waiting request cannot get memory while nothing runs (then it never will:
        the engine refuses such requests when they are added)."""
        budget, chunks = self.max_num_batched_tokens, []
        needs = 0  # blocks the chunks chosen so far will take
        free = self.blocks.num_free_blocks  # changes only when a preemption frees blocks
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.last_pending:  # its final token is being sampled: it leaves when that is read
                i += 1
                continue
            n = min(req.num_tokens - req.num_computed, budget)
            need = self.blocks.blocks_needed(req.request_id, n)
            while needs + need > free:
                self._preempt(self.running[-1])  # the latest admitted gives way (maybe req itself)
                free = self.blocks.num_free_blocks
                if req.status is not Status.RUNNING:
                    break
            if req.status is not Status.RUNNING:
                break  # req preempted itself: every request after it is gone too
            needs += need
            chunks.append((req, n))
            budget -= n
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if req.num_pending:  # preempted with a token still on the device: recompute needs its value
                break
            req.num_computed = self.blocks.allocate(req.request_id, req.all_ids)
            n = min(req.num_tokens - req.num_computed, budget)
            need = self.blocks.blocks_needed(req.request_id, n)
            if needs + need > self.blocks.num_free_blocks:  # (reviving cached blocks changed the count)
                self.blocks.cancel(req.request_id)  # not this step: give back the prefix blocks it revived
                req.num_computed = 0
                break
            needs += need
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            chunks.append((req, n))
            budget -= n
        return chunks

    def _preempt(self, req: Request) -> None:
        """Free ``req``'s blocks and queue it first again, to be recomputed (tokens kept)."""
        self.blocks.free(req.request_id)
        self.running.remove(req)
        req.num_computed, req.status = 0, Status.WAITING
        req.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def finish(self, req: Request, reason: str) -> None:
        """``req`` is done (stop, length or abort): free its memory and drop it from the queues."""
        if req.status is Status.RUNNING:
            self.running.remove(req)
            self.blocks.free(req.request_id)
        elif req.status is Status.WAITING:
            self.waiting.remove(req)
        req.status, req.finish_reason = Status.FINISHED, reason
