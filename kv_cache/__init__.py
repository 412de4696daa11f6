"""KV caches for autoregressive attention.  Depends on torch only; knows no model.

Import the cache you need from the package itself (every name below is importable from here)::

    from kv_cache import DynamicKVCache, StaticKVCache

Where things live, by subsystem (each subpackage's docstring lists its files)::

    kv_cache/
        errors.py        every error type (CacheCapacityError, PoolExhaustedError, ...)
        validate.py      the shared argument checks (positive ints, layer indices)
        basic/           every token kept: the Cache interface, dynamic, static, fixed-shape, encoder-decoder
        long_context/    bounded memory or fewer bytes: sliding window, sinks, importance top-k, quantized
        paged/           the paged memory manager: block pool, eviction, prefix cache, view, monitor, config
        reference/       the reference documents' own APIs: manual KVCache, the mixin, linear_kv_cache_attention

``long_context`` and ``paged`` build on ``basic``; ``reference`` builds on ``basic``, ``long_context`` and
``paged``; nothing here imports a model.

``Cache``               the interface every cache implements (``update``, ``get_seq_length``...)
``DynamicKVCache``      grows on demand, amortised O(1) appends
``StaticKVCache``       preallocated ``max_batch_size x max_cache_len``; GQA; bhsd/bshd layouts
``SubStaticCache``      a batch-row slice of a ``StaticKVCache`` (one pool, many requests)
``FixedShapeKVCache``   static cache written at a tensor slot, sync-free (torch.compile / CUDA graphs)
``SlotView``            a ``FixedShapeKVCache`` as the model's forward sees it in one fixed-shape step
``EncoderDecoderCache`` self-attention cache + cross-attention cache computed once per source
``KVCache``             manual API with explicit ``seq_len`` positions (self / cross)
``CacheCapacityError``  raised when a preallocated cache would overflow
"""

# Errors (kv_cache/errors.py).
from .errors import CacheCapacityError, EvictedSequenceError, PoolExhaustedError, UnknownSequenceError

# Basic caches (kv_cache/basic/).
from .basic import (Cache, DynamicKVCache, EncoderDecoderCache, FixedShapeKVCache, SlotView, StaticKVCache,
                    SubStaticCache)

# Long-context caches (kv_cache/long_context/).
# ``SlidingWindowKVCache``   the last ``window`` tokens in a ring buffer
# ``SinkKVCache``            StreamingLLM: first tokens + a window, positions inside the cache
# ``LinearKVCache``          the ``keep_window_size`` most important tokens (static importance)
# ``QuantizedKVCache``       2/4/8-bit keys/values plus a full-precision recent window
from .long_context import LinearKVCache, QuantizedKVCache, SinkKVCache, SlidingWindowKVCache, dequantize, quantize

# Paged KV memory manager (kv_cache/paged/): PagedAttention-style block pool, eviction, prefix sharing.
# ``CacheConfig`` / ``EvictionPolicy``   size, budget and eviction policy of the pool
# ``AdvancedKVCache``                   many sequences in one budgeted block pool
# ``EvictedSequenceError``              appending to a sequence the pool evicted (re-prefill it)
# ``PagedCacheView``                    a batch of its sequences behind the ``Cache`` API
# ``BlockManager`` / ``PagedBatch``     block tables of a serving engine; one packed step as a cache
# ``CachePerformanceMonitor``           snapshots, trends and recommendations
from .paged import (AdvancedKVCache, BlockManager, BlockPool, CacheConfig, CachePerformanceMonitor, EvictionPolicy,
                    PagedBatch, PagedBlocks, PagedCacheView,
                    block_hash, create_cache_config_for_speculative_decoding)

# The reference documents' own APIs (kv_cache/reference/).
# ``KVCache``                     the manual cache (``initialize_cache`` / ``update_cache`` / ``get_cached_kv``)
# ``CachedAttentionMixin``        lets any attention module use an ``AdvancedKVCache`` by ``sequence_id``
# ``linear_kv_cache_attention``   attention over a ``LinearKVCache`` (flash-dmattn's API)
from .reference import CachedAttentionMixin, KVCache, linear_kv_cache_attention

__all__ = [
    # errors
    "CacheCapacityError", "EvictedSequenceError", "PoolExhaustedError", "UnknownSequenceError",
    # basic
    "Cache", "DynamicKVCache", "EncoderDecoderCache", "FixedShapeKVCache", "SlotView", "StaticKVCache",
    "SubStaticCache",
    # long context
    "LinearKVCache", "QuantizedKVCache", "SinkKVCache", "SlidingWindowKVCache", "dequantize", "quantize",
    # paged memory manager
    "AdvancedKVCache", "BlockManager", "BlockPool", "CacheConfig", "CachePerformanceMonitor", "EvictionPolicy",
    "PagedBatch", "PagedBlocks", "PagedCacheView",
    "block_hash", "create_cache_config_for_speculative_decoding",
    # reference APIs
    "CachedAttentionMixin", "KVCache", "linear_kv_cache_attention",
]
