"""The basic caches: every token is kept, exactly.

``base.py``             the ``Cache`` interface and ``BufferedCache`` (buffers with spare room)
``dynamic.py``          ``DynamicKVCache``: grows on demand, amortised O(1) appends
``static.py``           ``StaticKVCache`` (preallocated, GQA, bhsd/bshd) and ``SubStaticCache``
``compiled_static.py``  ``FixedShapeKVCache``: a static cache written at a tensor slot (compile / CUDA graphs),
                        and ``SlotView``, that cache as a model's forward sees it in one fixed-shape step
``encoder_decoder.py``  ``EncoderDecoderCache``: self-attention cache + cross-attention cache
"""

from .base import BufferedCache, Cache
from .compiled_static import FixedShapeKVCache, SlotView
from .dynamic import DynamicKVCache
from .encoder_decoder import EncoderDecoderCache
from .static import StaticKVCache, SubStaticCache

__all__ = ["BufferedCache", "Cache", "DynamicKVCache", "EncoderDecoderCache", "FixedShapeKVCache",
           "SlotView", "StaticKVCache", "SubStaticCache"]
