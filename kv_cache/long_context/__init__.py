"""The long-context caches: bounded memory (window, sinks, importance) or fewer bytes (quantized).

``sliding_window.py``  ``SlidingWindowKVCache``: the last ``window`` tokens in a ring buffer
``sinks.py``           ``SinkKVCache``: StreamingLLM, the first tokens + a window
``linear.py``          ``LinearKVCache``: the ``keep_window_size`` most important tokens, exactly
``quantized.py``       ``QuantizedKVCache``: 2/4/8-bit keys/values + a full-precision recent window
"""

from .linear import LinearKVCache
from .quantized import QuantizedKVCache, dequantize, quantize
from .sinks import SinkKVCache
from .sliding_window import SlidingWindowKVCache

__all__ = ["LinearKVCache", "QuantizedKVCache", "SinkKVCache", "SlidingWindowKVCache", "dequantize", "quantize"]
