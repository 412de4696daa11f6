"""Transformer models that decode with a KV cache.

* :class:`ModelConfig` -- every hyper-parameter, validated.
* :class:`DecoderOnlyTransformer` -- GPT-style language model.
* :class:`EncoderDecoderTransformer` -- sequence-to-sequence model with self- and
  cross-attention caches.
* :class:`EnhancedTransformer` / :class:`OptimizedTransformer` -- the tutorial-style API
  (``enable_cache``, ``generate(src, max_length, ...)``).
* :func:`generate` and the sampling functions in :mod:`transformer.sampling`.
* :class:`FastDecoder` -- fixed-shape, sync-free decoding for ``torch.compile`` / CUDA graphs
  (``generate(..., compile=True)``).
"""

from .config import ModelConfig
from .encoder_decoder import EncoderDecoderTransformer
from .fast_decode import FastDecoder
from .enhanced import EnhancedTransformer, OptimizedTransformer
from .generation import GenerateOutput, generate, make_cache
from .model import DecoderOnlyTransformer
from .sampling import process_logits, sample_next_token, top_k_filter, top_p_filter

__all__ = [
    "ModelConfig", "DecoderOnlyTransformer", "EncoderDecoderTransformer", "EnhancedTransformer",
    "OptimizedTransformer", "generate", "make_cache", "GenerateOutput", "process_logits", "sample_next_token",
    "top_k_filter", "top_p_filter", "FastDecoder",
]
