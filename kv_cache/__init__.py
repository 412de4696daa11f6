"""KV caches for autoregressive attention.  Depends on torch only; knows no model.

Import the cache you need::

    from kv_cache import DynamicKVCache, StaticKVCache

``Cache``               the interface every cache implements (``update``, ``get_seq_length``...)
``DynamicKVCache``      grows on demand, amortised O(1) appends
``StaticKVCache``       preallocated ``max_batch_size x max_cache_len``; GQA; bhsd/bshd layouts
``SubStaticCache``      a batch-row slice of a ``StaticKVCache`` (one pool, many requests)
``EncoderDecoderCache`` self-attention cache + cross-attention cache computed once per source
``KVCache``             manual API with explicit ``seq_len`` positions (self / cross)
``CacheCapacityError``  raised when a preallocated cache would overflow
"""

from .base import Cache
from .dynamic import DynamicKVCache
from .encoder_decoder import EncoderDecoderCache
from .manual import KVCache
from .static import CacheCapacityError, StaticKVCache, SubStaticCache

__all__ = [
    "Cache",
    "CacheCapacityError",
    "DynamicKVCache",
    "EncoderDecoderCache",
    "KVCache",
    "StaticKVCache",
    "SubStaticCache",
]
