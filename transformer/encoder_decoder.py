"""``EncoderDecoderTransformer``: the original "Attention Is All You Need" shape, pre-norm.

The encoder reads the whole source at once (no causal mask; padding masked).  The decoder
is the same causal stack as the decoder-only model, plus one cross-attention sub-layer per
block that reads the encoder output ("memory").

Caching has two halves (``kv_cache.EncoderDecoderCache``):

* the **self-attention cache** grows by one token per decoding step, as in a GPT;
* the **cross-attention cache** holds each decoder layer's keys/values of the memory.  The
  source does not change while we decode, so they are projected once -- on the first step --
  and reused on all later steps.  Without a cache every step re-projects the whole source.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .config import ModelConfig
from .layers import RotaryEmbedding, init_weights, make_norm
from .model import Block, TokenDecoder


class Encoder(nn.Module):
    """Bidirectional transformer encoder: ``src (B, S_src)`` -> memory ``(B, S_src, d_model)``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.src_vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model) if config.pos_encoding == "learned" else None
        self.rotary = (RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
                       if config.pos_encoding == "rope" else None)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_encoder_layers))
        self.norm_f = make_norm(config)

    def forward(self, src: torch.Tensor, src_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, S = src.shape
        if S > self.config.max_seq_len:
            raise ValueError(f"source length {S} exceeds max_seq_len={self.config.max_seq_len}")
        positions = torch.arange(S, device=src.device).expand(B, S)
        x = self.tok_emb(src)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        else:
            rope = self.rotary(positions)
        x = self.drop(x)
        mask = source_key_mask(src_mask)
        for block in self.blocks:
            x = block(x, mask=mask, rope=rope)
        return self.norm_f(x)


def source_key_mask(src_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``(B, S_src)`` 1 = real token -> boolean ``(B, 1, 1, S_src)`` key mask, or ``None``."""
    if src_mask is None:
        return None
    return src_mask.bool()[:, None, None, :]


class EncoderDecoderTransformer(nn.Module):
    """Sequence-to-sequence transformer with self- and cross-attention caches.

    ``forward(src, tgt, src_mask=None, tgt_mask=None, cache=None, cache_position=None,
    memory=None, num_logits_to_keep=0) -> logits (B, T, vocab_size)``

    * ``src``: ``(B, S_src)`` source ids; ``src_mask`` ``(B, S_src)`` 1 = real, 0 = padding.
    * ``tgt``: ``(B, T)`` decoder input ids (teacher forcing in training: BOS + target[:-1]).
    * ``tgt_mask``: ``(B, past + T)`` 1 = real, 0 = padding for the decoder tokens.
    * ``cache``: an ``EncoderDecoderCache`` (self half grows, cross half filled once), or None.
    * ``memory``: the encoder output, if already computed (generation encodes once).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = TokenDecoder(config, cross=True)
        init_weights(self, config.n_layers + config.n_encoder_layers)

    def encode(self, src: torch.Tensor, src_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run the encoder once: ``(B, S_src)`` -> memory ``(B, S_src, d_model)``."""
        return self.encoder(src, src_mask)

    def decode(self, tgt, memory, src_mask=None, tgt_mask=None, cache=None, cache_position=None, position_ids=None,
               num_logits_to_keep=0):
        """Run the decoder over ``tgt`` ``(B, T)`` given ``memory``; returns logits."""
        self_cache = cache.self_attention_cache if cache is not None else None
        return self.decoder(tgt, cache=self_cache, cache_position=cache_position, attention_mask=tgt_mask,
                            position_ids=position_ids, num_logits_to_keep=num_logits_to_keep, memory=memory,
                            memory_mask=source_key_mask(src_mask), cross_cache=cache)

    def forward(self, src, tgt, src_mask=None, tgt_mask=None, cache=None, cache_position=None, memory=None,
                num_logits_to_keep: int = 0):
        if memory is None:
            memory = self.encode(src, src_mask)
        return self.decode(tgt, memory, src_mask=src_mask, tgt_mask=tgt_mask, cache=cache,
                           cache_position=cache_position, num_logits_to_keep=num_logits_to_keep)

    def new_cache(self, kind: str = "dynamic", batch_size: int = 1, max_cache_len: Optional[int] = None,
                  layout: str = "bhsd", src_len: Optional[int] = None):
        """An empty ``EncoderDecoderCache`` for this model (static needs both lengths)."""
        from kv_cache import DynamicKVCache, EncoderDecoderCache
        from .generation import make_cache
        w = self.decoder.lm_head.weight
        self_cache = make_cache(self.config, kind, batch_size, max_cache_len, layout, w)
        if kind == "dynamic":  # written once, so allocate exactly the source length
            cross_cache = DynamicKVCache(layout=layout, initial_capacity=1)
        else:
            cross_cache = make_cache(self.config, kind, batch_size, src_len, layout, w)
        return EncoderDecoderCache(self_cache, cross_cache)

    def num_parameters(self) -> int:
        """Number of parameters (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def generate(self, src: torch.Tensor, max_new_tokens: int, decoder_input_ids: Optional[torch.Tensor] = None,
                 src_mask: Optional[torch.Tensor] = None, **kwargs):
        """Translate ``src`` ``(B, S_src)``: decode up to ``max_new_tokens`` after the decoder prompt.

        ``decoder_input_ids`` defaults to one ``bos_token_id`` per row.  Returns
        ``(B, prompt + n)`` decoder tokens.  The encoder runs once; every other option is that of
        :func:`transformer.generation.generate`.
        """
        from .generation import generate
        if decoder_input_ids is None:
            bos = self.config.bos_token_id
            if bos is None:
                raise ValueError("decoder_input_ids is None and config.bos_token_id is None; give one of them")
            decoder_input_ids = torch.full((src.shape[0], 1), bos, dtype=torch.long, device=src.device)
        return generate(self, decoder_input_ids, max_new_tokens, src=src, src_mask=src_mask, **kwargs)
