"""The paged memory manager: many sequences in one budgeted pool of fixed-size blocks.

``config.py``        ``CacheConfig`` / ``EvictionPolicy``: size, budget and policy of the pool
``block_pool.py``    ``BlockPool``: the blocks, their reference counts and the prefix index
``advanced.py``      ``AdvancedKVCache``: the manager (sequences' life cycle, writes, reads)
``eviction.py``      what each ``EvictionPolicy`` gives up when the pool is full
``prefix_cache.py``  ``block_hash``: sharing the blocks of a common prompt prefix
``view.py``          ``PagedCacheView``: a batch of the manager's sequences behind the ``Cache`` API
``block_manager.py`` ``BlockManager`` / ``PagedBatch``: the pool as a serving engine's memory, step by step
``rows.py``          ``RowBuffer`` / ``RowsStep``: a dense row per running request, read in place (CPU decoding)
``pool_stats.py``    counters and the statistics dictionary
``monitor.py``       ``CachePerformanceMonitor``: snapshots, trends and recommendations
"""

from .advanced import AdvancedKVCache
from .block_manager import BlockManager, PagedBatch, PagedBlocks
from .block_pool import BlockPool
from .config import CacheConfig, EvictionPolicy, create_cache_config_for_speculative_decoding
from .monitor import CachePerformanceMonitor
from .prefix_cache import block_hash
from .rows import RowBuffer, RowsStep
from .view import PagedCacheView

__all__ = ["AdvancedKVCache", "BlockManager", "BlockPool", "CacheConfig", "CachePerformanceMonitor", "EvictionPolicy",
           "PagedBatch", "PagedBlocks", "RowBuffer", "RowsStep",
           "PagedCacheView", "block_hash", "create_cache_config_for_speculative_decoding"]
