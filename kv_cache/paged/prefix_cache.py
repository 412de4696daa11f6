"""Prefix caching: find the blocks another request already computed for the same leading tokens.

Many requests start alike (a system prompt, a few-shot preamble, the earlier turns of a chat).
Their keys and values over that common start are identical -- a causal model's key at position
``p`` depends on tokens ``0..p`` only -- so they need to be computed and stored once.

The unit of sharing is a *full* block.  Its identity is a hash chained over the blocks before
it, as in vLLM's automatic prefix caching::

    h_0 = H("root",  tokens 0..B-1)
    h_i = H(h_{i-1}, tokens iB..(i+1)B-1)

so equal hashes mean equal tokens *and* equal prefixes (hence equal keys/values).  The block
pool keeps ``hash -> block``; a request's prompt is hashed block by block and looked up until
the first miss (:func:`match_cached_blocks`).  A sequence's own blocks enter the index once
they are full in every layer and their token ids are known (:func:`register_full_blocks`).

Functions only: the book-keeping lives in :class:`~kv_cache.paged.block_pool.BlockPool` (the
index) and :class:`~kv_cache.paged.block_pool.SequenceState` (each sequence's tokens and hashes).
"""

from __future__ import annotations

import array
import hashlib
from typing import List, Optional, Sequence, Tuple

import torch

from .block_pool import BlockPool, SequenceState


def block_hash(parent: Optional[bytes], token_ids: Sequence[int]) -> bytes:
    """The identity of a full block: SHA-256 of the parent block's hash and this block's token ids.

    Chaining the parent makes the hash depend on *every* token before the block, so two blocks
    with equal tokens but different prefixes (hence different keys/values) never match.
    Cost: one hash of ``8 * block_size`` bytes.
    """
    h = hashlib.sha256(parent or b"root")
    h.update(array.array("q", token_ids).tobytes())
    return h.digest()


def token_list(token_ids) -> List[int]:
    """``token_ids`` (a sequence or a 1-D tensor) as a list of non-negative ints, or ``ValueError``."""
    ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
    if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
        raise ValueError(f"token_ids must be non-negative ints, got {ids[:10]}{'...' if len(ids) > 10 else ''}")
    return ids


def match_cached_blocks(pool: BlockPool, token_ids: List[int], block_size: int) -> Tuple[List[int], List[bytes]]:
    """The cached blocks holding the longest run of full blocks at the start of ``token_ids``,
    and their hashes.  Read-only (the caller takes references with ``pool.revive``).
    Cost: one hash and one dict lookup per full block, until the first miss."""
    blocks, hashes, parent = [], [], None
    for i in range(len(token_ids) // block_size):
        parent = block_hash(parent, token_ids[i * block_size:(i + 1) * block_size])
        b = pool.lookup(parent)
        if b is None:
            break
        blocks.append(b)
        hashes.append(parent)
    return blocks, hashes


def register_full_blocks(pool: BlockPool, seq: SequenceState, block_size: int) -> None:
    """Index every block of ``seq`` that is now full in all layers and whose token ids are known.

    ``seq.hashes`` grows by one chained hash per newly full block.  A block dropped by the
    sliding window (``None``) keeps its place in the chain but is not indexed.
    """
    n_full = min(min(seq.lengths), len(seq.token_ids)) // block_size
    for i in range(len(seq.hashes), n_full):
        h = block_hash(seq.hashes[-1] if seq.hashes else None, seq.token_ids[i * block_size:(i + 1) * block_size])
        seq.hashes.append(h)
        b = seq.blocks[i]
        if b is not None and pool.block_hashes[b] != h:
            pool.register(b, h)
