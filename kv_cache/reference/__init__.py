"""The reference documents' own APIs, with the signatures those documents use.

``manual.py``            ``KVCache``: ``initialize_cache`` / ``update_cache`` / ``get_cached_kv`` (self / cross)
``attention_mixin.py``   ``CachedAttentionMixin``: any attention module on an ``AdvancedKVCache``
``linear_attention.py``  ``linear_kv_cache_attention``: attention over a ``LinearKVCache``
"""

from .attention_mixin import CachedAttentionMixin
from .linear_attention import linear_kv_cache_attention
from .manual import KVCache

__all__ = ["CachedAttentionMixin", "KVCache", "linear_kv_cache_attention"]
