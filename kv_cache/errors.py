"""Every error type of ``kv_cache``, in one place.

Each one subclasses a built-in error, so ``except ValueError`` / ``except KeyError`` keeps
working for callers that do not know these names::

    ValueError
    └── CacheCapacityError            a write or a batch change would overflow a preallocated cache
        └── PoolExhaustedError        the paged pool has no free block and may not evict one
    KeyError
    └── UnknownSequenceError          the paged manager holds no sequence with this id
        └── EvictedSequenceError      ... because the pool evicted it (re-prefill it)

Messages name the parameter, the value received and what was expected.
"""

from __future__ import annotations


class CacheCapacityError(ValueError):
    """A write or a batch change would exceed a preallocated cache's capacity.

    Subclasses ``ValueError`` so ``except ValueError`` still catches it.  The message names the
    current length, the number of new tokens (or rows) and the capacity.
    """


class PoolExhaustedError(CacheCapacityError):
    """No free block is left and the eviction policy may not (or cannot) free one.

    Subclasses :class:`CacheCapacityError` (itself a ``ValueError``).  The message names the
    blocks needed, the blocks free, the budget and the policy.
    """


class UnknownSequenceError(KeyError):
    """An operation named a ``sequence_id`` the manager does not hold (a ``KeyError``)."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


class EvictedSequenceError(UnknownSequenceError):
    """An append (or a :class:`~kv_cache.paged.view.PagedCacheView`) tried to *continue* a
    sequence the pool evicted.  Its keys/values are gone; continuing would restart it empty.

    Re-prefill it instead: ``set_cache`` its whole keys/values (a deliberate restart), or
    ``clear_sequence(id)`` (or ``add_sequence(id, ...)``) and append from token 0.  Subclasses
    :class:`UnknownSequenceError` (a ``KeyError``): the id is not held.
    """


__all__ = ["CacheCapacityError", "EvictedSequenceError", "PoolExhaustedError", "UnknownSequenceError"]
