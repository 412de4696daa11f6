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

# Paged KV memory manager (PagedAttention-style block pool, eviction, prefix sharing).
# ``CacheConfig`` / ``EvictionPolicy``   size, budget and eviction policy of the pool
# ``AdvancedKVCache``                   many sequences in one budgeted block pool
# ``EvictedSequenceError``              appending to a sequence the pool evicted (re-prefill it)
# ``PagedCacheView``                    a batch of its sequences behind the ``Cache`` API
# ``CachedAttentionMixin``              lets any attention module use it by ``sequence_id``
# ``CachePerformanceMonitor``           snapshots, trends and recommendations
from .advanced import AdvancedKVCache, EvictedSequenceError, UnknownSequenceError
from .attention_mixin import CachedAttentionMixin
from .cache_config import CacheConfig, EvictionPolicy, create_cache_config_for_speculative_decoding
from .monitor import CachePerformanceMonitor
from .paged import BlockPool, PoolExhaustedError
from .paged_view import PagedCacheView
from .prefix_cache import block_hash

__all__ += [
    "AdvancedKVCache", "BlockPool", "CacheConfig", "CachePerformanceMonitor", "CachedAttentionMixin",
    "EvictedSequenceError", "EvictionPolicy", "PagedCacheView", "PoolExhaustedError", "UnknownSequenceError", "block_hash",
    "create_cache_config_for_speculative_decoding",
]

# Long-context caches: bounded memory (window, sinks, importance) or fewer bytes (quantized).
# ``SlidingWindowKVCache``   the last ``window`` tokens in a ring buffer
# ``SinkKVCache``            StreamingLLM: first tokens + a window, positions inside the cache
# ``LinearKVCache``          the ``keep_window_size`` most important tokens (static importance)
# ``QuantizedKVCache``       2/4/8-bit keys/values plus a full-precision recent window
from .linear import LinearKVCache, linear_kv_cache_attention
from .quantized import QuantizedKVCache, dequantize, quantize
from .sinks import SinkKVCache
from .sliding_window import SlidingWindowKVCache

__all__ += [
    "LinearKVCache", "QuantizedKVCache", "SinkKVCache", "SlidingWindowKVCache", "dequantize",
    "linear_kv_cache_attention", "quantize",
]

# Fixed-shape static cache for torch.compile / CUDA graphs (sync-free ``write`` at a tensor slot).
from .compiled_static import FixedShapeKVCache

__all__ += ["FixedShapeKVCache"]
