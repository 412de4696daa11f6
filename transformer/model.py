"""``DecoderOnlyTransformer``: a GPT-style language model that can decode with a KV cache.

Read top to bottom: a pre-norm ``Block`` (attention then MLP, each added to the residual
stream), then the model (embeddings -> blocks -> final norm -> logits), then ``generate``.

Two ways to run the same weights:

* **uncached** (``cache=None``): the whole sequence in one pass with a causal mask.  This is
  training, and it is the *reference* every cache is tested against.
* **cached**: pass a ``kv_cache.Cache``.  Each layer appends the new tokens' keys/values to
  the cache and attends over what the cache returns, so a decoding step processes one token.
  Every cache says which positions the returned keys hold (``cache.key_positions``: all of
  them for most caches, a subset for a window or sinks) and the mask is built from those
  positions after the update, in one place (:class:`~transformer.layers.MaskPlan`).
  ``config.sliding_window`` limits attention to the most recent positions in both modes.

Shapes: ``input_ids`` ``(B, S)`` -> logits ``(B, S, vocab_size)`` (or the last
``num_logits_to_keep`` positions only).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .attention import Attention
from .config import ModelConfig
from .layers import MLP, RotaryEmbedding, init_weights, make_norm, plan_mask


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

    With ``cross=True`` (encoder-decoder decoder blocks) a cross-attention sub-layer over the
    encoder memory sits between the two.  Shape ``(B, S, d_model)`` in and out.
    """

    def __init__(self, config: ModelConfig, cross: bool = False):
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = Attention(config)
        self.cross = cross
        if cross:
            self.norm_cross = make_norm(config)
            self.cross_attn = Attention(config, is_cross=True)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, *, mask=None, rope=None, rotary=None, cache=None, layer_idx=0,
                cache_position=None, memory=None, memory_mask=None, cross_cache=None):
        x = x + self.attn(self.norm1(x), mask=mask, rope=rope, rotary=rotary, cache=cache,
                          layer_idx=layer_idx, cache_position=cache_position)
        if self.cross:
            x = x + self.cross_attn(self.norm_cross(x), mask=memory_mask, cache=cross_cache,
                                    layer_idx=layer_idx, memory=memory)
        return x + self.mlp(self.norm2(x))


class TokenDecoder(nn.Module):
    """Embeddings, a stack of causal blocks and the output head: the part shared by the
    decoder-only model and the decoder of the encoder-decoder model.
    """

    def __init__(self, config: ModelConfig, cross: bool = False):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model) if config.pos_encoding == "learned" else None
        self.rotary = (RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
                       if config.pos_encoding == "rope" else None)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, cross=cross) for _ in range(config.n_layers))
        self.norm_f = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def forward(self, input_ids, *, cache=None, cache_position=None, attention_mask=None, position_ids=None,
                num_logits_to_keep=0, memory=None, memory_mask=None, cross_cache=None):
        B, S = input_ids.shape
        if cache_position is None:  # append after what the cache holds: its length is on the host
            past = cache.get_seq_length(0) if cache is not None else 0
            slots = torch.arange(past, past + S, device=input_ids.device)  # (S,)
        else:  # slots given as a tensor (a fixed-shape step): never read back to the host
            past, slots = None, torch.atleast_1d(cache_position)
        if position_ids is None:
            position_ids = slots.expand(B, S) if slots.dim() == 1 else slots  # (B, S)
        x = self.tok_emb(input_ids)  # (B, S, d_model)
        rope = None
        if self.pos_emb is not None:
            self._check_positions(position_ids, past + S - 1 if past is not None and S else None)
            x = x + self.pos_emb(position_ids)
        else:
            rope = self.rotary(position_ids)  # (cos, sin), each (B, S, 1, head_dim/2)
        x = self.drop(x)
        # Decided here, built by each attention layer from the key positions its cache reports.
        mask = plan_mask(slots, past, cache, attention_mask, self.config.sliding_window)
        for i, block in enumerate(self.blocks):
            x = block(x, mask=mask, rope=rope, rotary=self.rotary, cache=cache, layer_idx=i,
                      cache_position=cache_position, memory=memory, memory_mask=memory_mask,
                      cross_cache=cross_cache)
        if isinstance(num_logits_to_keep, torch.Tensor):  # indices of the positions to keep (a packed batch)
            x = x[:, num_logits_to_keep]
        elif num_logits_to_keep:
            x = x[:, -num_logits_to_keep:]
        return self.head(self.norm_f(x))  # (B, S or num_logits_to_keep, vocab_size)

    def _check_positions(self, position_ids: torch.Tensor, known_max: Optional[int]) -> None:
        """Refuse positions past the learned table with a message rather than an index error.
        Free when the largest position is known on the host; positions given as a CPU tensor
        are read (cheap); on a GPU, or while compiling, the check would be a sync, so it is left
        to the embedding's own bound check (a device-side assert)."""
        if known_max is None:
            if torch.compiler.is_compiling() or position_ids.device.type != "cpu" or position_ids.numel() == 0:
                return
            known_max = int(position_ids.max())
        if known_max >= self.config.max_seq_len:
            raise ValueError(
                f"position {known_max} is beyond max_seq_len={self.config.max_seq_len} of this model's "
                f"learned position table; shorten the input or generate fewer tokens")

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits ``(..., vocab_size)`` of final hidden states ``h`` ``(..., d_model)``.

        ``lm_head`` stores ``(vocab, d_model)`` (tied to the embedding).  Decoding multiplies a
        few rows by it, and on a CPU that product streams a ``(d_model, vocab)`` copy about 3x
        faster (measured 0.38 vs 1.25 ms for 384 x 8192 on one core; see
        :class:`~transformer.layers.Linear`).  So CPU inference of at most 16 rows uses such a
        copy, made once and again only after the weights change (memory: one more
        ``vocab * d_model`` matrix while the model decodes on CPU).  Training (gradients on),
        GPUs and ``torch.compile`` (which packs the weights itself) use ``lm_head`` directly.
        Cost: ``2 * d_model * vocab`` FLOPs per row.
        """
        w = self.lm_head.weight
        if (h.device.type != "cpu" or torch.is_grad_enabled() or h.numel() > 16 * h.shape[-1]
                or torch.compiler.is_compiling()):
            return self.lm_head(h)
        key = (w.data_ptr(), w._version, w.dtype, torch.is_inference_mode_enabled())
        cached = self.__dict__.get("_head_t")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_head_t"] = key, w.detach().t().contiguous()
        return h @ cached[1]


class DecoderOnlyTransformer(nn.Module):
    """A GPT-style causal language model.

    ``forward(input_ids, cache=None, cache_position=None, attention_mask=None,
    position_ids=None, num_logits_to_keep=0) -> logits``

    * ``input_ids``: ``(B, S)`` token ids.
    * ``cache``: a ``kv_cache.Cache``; ``None`` runs the full prefix (the uncached reference).
    * ``cache_position``: cache slots for the new tokens (``None`` = append after the cache).
    * ``attention_mask``: ``(B, past + S)`` 1 for real tokens, 0 for padding (left padding).
    * ``position_ids``: ``(B, S)`` positions fed to the position encoding (default: the slots).
    * ``num_logits_to_keep``: compute logits for the last ``n`` positions only (0 = all), or,
      as a 1-D long tensor, for those positions of the sequence (the last token of each
      request in a packed serving step).

    Returns ``(B, S or n, vocab_size)`` logits.  Cost: about ``2 * n_params`` FLOPs per token
    plus attention over the cached history.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.decoder = TokenDecoder(config)
        init_weights(self, config.n_layers)

    @classmethod
    def from_pretrained_gpt2(cls, path, device="cpu", dtype=torch.float32) -> "DecoderOnlyTransformer":
        """Load a Hugging Face GPT-2 folder (``config.json`` + ``model.safetensors`` or
        ``pytorch_model.bin``) without ``transformers``; eval mode.  See :mod:`transformer.gpt2`."""
        from .gpt2 import load_gpt2_model
        return load_gpt2_model(path, device=device, dtype=dtype)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device="cpu") -> "DecoderOnlyTransformer":
        """Load a local Hugging Face folder (``config.json`` + safetensors, one file or shards) of
        ``model_type`` gpt2, llama, mistral, qwen2 or qwen3, without ``transformers`` and without
        unpickling; ``dtype`` ``None`` = the folder's own.  Eval mode; peak memory about the
        weights plus one shard.  See :func:`transformer.hf_models.load_pretrained`."""
        from .hf_models import load_pretrained
        return load_pretrained(path, dtype=dtype, device=device)

    def forward(self, input_ids, cache=None, cache_position=None, attention_mask=None, position_ids=None,
                num_logits_to_keep: int = 0):
        return self.decoder(input_ids, cache=cache, cache_position=cache_position, attention_mask=attention_mask,
                            position_ids=position_ids, num_logits_to_keep=num_logits_to_keep)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters (tied weights counted once)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.decoder.tok_emb.weight.numel()
            if self.decoder.pos_emb is not None:
                n -= self.decoder.pos_emb.weight.numel()
        return n

    def new_cache(self, kind: str = "dynamic", batch_size: int = 1, max_cache_len: Optional[int] = None,
                  layout: str = "bhsd", **cache_config):
        """Make an empty cache shaped for this model: ``kind`` = ``"dynamic"``, ``"static"``,
        ``"sliding_window"``, ``"sinks"`` or ``"quantized"``.

        A static cache needs ``max_cache_len`` (prompt + new tokens).  dtype/device follow the
        model's parameters.  ``cache_config``: options of the long-context caches (``window``,
        ``num_sink_tokens``, ``nbits``, ``group_size``, ``residual_length``; see
        :func:`transformer.generation.make_cache`).
        """
        from .generation import make_cache
        return make_cache(self.config, kind, batch_size, max_cache_len, layout, self.decoder.lm_head.weight,
                          **cache_config)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs):
        """Continue ``input_ids`` ``(B, P)`` by up to ``max_new_tokens`` tokens.

        Returns a ``LongTensor`` ``(B, P + n)`` (prompt included).  See
        :func:`transformer.generation.generate` for every option (``use_cache``,
        ``cache_implementation``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
        ``eos_token_id``, ``generator``, ``attention_mask``...).
        """
        from .generation import generate
        return generate(self, input_ids, max_new_tokens, **kwargs)
