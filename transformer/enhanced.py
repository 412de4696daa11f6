"""``EnhancedTransformer`` / ``OptimizedTransformer``: the API of the classic KV-cache tutorial.

These wrap :class:`~transformer.encoder_decoder.EncoderDecoderTransformer` with the names a
reader of that tutorial expects: a constructor taking ``src_vocab_size, tgt_vocab_size,
d_model, num_heads, d_ff, num_layers``; ``enable_cache(max_seq_len)`` /
``disable_cache()`` / ``clear_cache()`` managing a manual :class:`kv_cache.KVCache` kept in
the ``kv_cache`` attribute; and ``generate(src, max_length, use_cache, temperature, top_k,
top_p)``.  Training is unchanged: ``logits = model(src, tgt)``.

Greedy decoding: pass ``temperature=0`` (or ``do_sample=False``).  Any ``temperature > 0``
samples, as in the tutorial.
"""

from __future__ import annotations

from typing import Optional

import torch

import kv_cache
from .config import ModelConfig
from .encoder_decoder import EncoderDecoderTransformer
from .generation import _UNSET
from .sampling import SamplingSettings


class EnhancedTransformer(EncoderDecoderTransformer):
    """Encoder-decoder transformer with an optional manual KV cache.

    Args:
        src_vocab_size, tgt_vocab_size: source / target vocabularies.
        d_model, num_heads, d_ff, num_layers: width, heads, MLP width, layers (encoder and decoder).
        max_seq_len: longest source or target sequence.
        dropout: dropout probability used in training.
        num_kv_heads: key/value heads (GQA); default ``num_heads``.
        pad_token_id, bos_token_id, eos_token_id: special ids (padding in ``src`` is masked).
        **config: any other :class:`~transformer.config.ModelConfig` field.

    ``forward(src (B, S), tgt (B, T)) -> logits (B, T, tgt_vocab_size)``.
    """

    def __init__(self, src_vocab_size: int, tgt_vocab_size: int, d_model: int = 512, num_heads: int = 8,
                 d_ff: int = 2048, num_layers: int = 6, max_seq_len: int = 512, dropout: float = 0.1,
                 num_kv_heads: Optional[int] = None, pad_token_id: Optional[int] = 0, bos_token_id: int = 1,
                 eos_token_id: Optional[int] = 2, **config):
        cfg = ModelConfig(vocab_size=tgt_vocab_size, src_vocab_size=src_vocab_size, d_model=d_model,
                          n_heads=num_heads, n_kv_heads=num_kv_heads, d_ff=d_ff, n_layers=num_layers,
                          max_seq_len=max_seq_len, dropout=dropout, pad_token_id=pad_token_id,
                          bos_token_id=bos_token_id, eos_token_id=eos_token_id, **config)
        super().__init__(cfg)
        self.kv_cache: Optional["kv_cache.KVCache"] = None

    # ------------------------------------------------------------------ cache control
    def enable_cache(self, max_seq_len: int = 2048) -> "kv_cache.KVCache":
        """Create ``self.kv_cache``: a manual :class:`kv_cache.KVCache` for up to ``max_seq_len``
        target tokens (and source tokens).  Storage is allocated by ``generate`` once the batch
        size is known: ``2 * 2 * n_layers * B * n_kv_heads * max_seq_len * head_dim`` elements
        (self and cross, keys and values)."""
        p = self.decoder.lm_head.weight
        self.kv_cache = kv_cache.KVCache(num_layers=self.config.n_layers, num_heads=self.config.n_kv_heads,
                                d_k=self.config.head_dim, max_seq_len=max_seq_len, dtype=p.dtype, device=p.device)
        return self.kv_cache

    def disable_cache(self) -> None:
        """Drop the cache: later ``generate`` calls with ``use_cache=True`` use a temporary dynamic cache."""
        self.kv_cache = None

    def clear_cache(self) -> None:
        """Forget the cached keys/values (keeps the cache enabled)."""
        if self.kv_cache is not None:
            self.kv_cache.clear_cache()

    # ------------------------------------------------------------------ model
    def _src_mask(self, src, src_mask):
        if src_mask is None and self.config.pad_token_id is not None:
            src_mask = (src != self.config.pad_token_id).long()
        return src_mask

    def forward(self, src, tgt, src_mask=None, tgt_mask=None, cache=None, cache_position=None, memory=None,
                num_logits_to_keep: int = 0):
        """Teacher-forced logits ``(B, T, V)``; source padding (``pad_token_id``) is masked."""
        return super().forward(src, tgt, self._src_mask(src, src_mask), tgt_mask, cache, cache_position, memory,
                               num_logits_to_keep)

    @torch.no_grad()
    def generate(self, src: torch.Tensor, max_length: int = 50, use_cache: bool = True, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, do_sample: Optional[bool] = None,
                 generator: Optional[torch.Generator] = None, src_mask: Optional[torch.Tensor] = None,
                 eos_token_id=_UNSET, **kwargs) -> torch.Tensor:
        """Decode a target for ``src`` ``(B, S)``: returns ``(B, <= max_length)``, BOS first.

        ``max_length`` counts the BOS token, so at most ``max_length - 1`` tokens are produced.
        ``use_cache=True`` uses ``self.kv_cache`` if :meth:`enable_cache` was called (else a
        temporary dynamic cache); ``False`` re-runs the decoder over the whole prefix per step.
        ``do_sample`` defaults to ``temperature > 0``; ``temperature=0`` is greedy.  Note the
        tutorial conventions: ``max_length`` counts BOS, and sampling is the default, unlike
        :meth:`EncoderDecoderTransformer.generate` (``max_new_tokens``, greedy by default).
        Other keyword arguments (``output_logits``, ``streamer``, ``cache_implementation``...)
        go to :func:`transformer.generation.generate`.
        """
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be an int >= 1 (it counts the BOS token), got {max_length!r}")
        # do_sample unset: sample iff temperature > 0 (the tutorial's convention; see transformer.sampling)
        do_sample = SamplingSettings(temperature, top_k, top_p, do_sample=do_sample).do_sample
        src_mask = self._src_mask(src, src_mask)
        cache = "dynamic"
        if use_cache and self.kv_cache is not None:
            limit = self.kv_cache.max_seq_len
            if max_length > limit or src.shape[1] > limit:
                raise ValueError(f"max_length={max_length} / source length {src.shape[1]} exceed the cache's "
                                 f"max_seq_len={limit}; call enable_cache(max_seq_len=...) with a larger value")
            self.kv_cache.initialize_cache(src.shape[0])
            cache = self.kv_cache.as_encoder_decoder_cache()
        return super().generate(src, max_length - 1, src_mask=src_mask, use_cache=use_cache,
                                cache_implementation=cache, do_sample=do_sample, temperature=temperature,
                                top_k=top_k, top_p=top_p, generator=generator, eos_token_id=eos_token_id, **kwargs)


class OptimizedTransformer(EnhancedTransformer):
    """:class:`EnhancedTransformer` with the KV cache enabled from construction.

    Extra argument ``cache_max_seq_len`` (default: ``max_seq_len``) sizes the cache.
    """

    def __init__(self, *args, cache_max_seq_len: Optional[int] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.enable_cache(cache_max_seq_len or self.config.max_seq_len)
