"""Autoregressive generation: prefill once, then decode one token per step.

The loop is the same for both models and for every cache::

    logits = prefill(prompt)                 # one pass over the prompt, fills the cache
    repeat max_new_tokens times:
        token = sample_next_token(logits)    # greedy / temperature / top-k / top-p
        logits = decode_one_token(token)     # one new token through the model + cache

Without a cache (``use_cache=False``) ``decode_one_token`` is replaced by a pass over the
whole sequence so far -- the reference that cached decoding must reproduce exactly.

Batches of prompts with different lengths are *left padded*: ``attention_mask`` marks real
tokens with 1.  Padding keys are masked out of attention and position ids count real tokens
only, so every row produces the same tokens as its prompt run alone.  Right padding (or a hole,
a 0 after a 1) is refused: new tokens are appended after the last column, so the first one
would be read off a pad.  Inputs are checked once, at entry (token ids below the vocab size,
masks of 0/1 only); the decode loop itself never synchronises with the host to check anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

import kv_cache
from kv_cache import Cache
from .config import ModelConfig
from .sampling import SamplingSettings, eos_hit, first_eos, sample_next_token

#: Caches that keep every token exactly: they can be rolled back (speculative decoding), have a
#: fixed-shape twin (``fast=True``) and serve the encoder-decoder model.
EXACT_CACHES = ("dynamic", "static")
#: Long-context caches (decoder-only, ``bhsd`` layout): they drop or compress old tokens.
LONG_CONTEXT_CACHES = ("sliding_window", "sinks", "quantized")
#: Every cache ``generate`` builds by name; the paths that take fewer name a subset above.
CACHE_IMPLEMENTATIONS = EXACT_CACHES + LONG_CONTEXT_CACHES
#: ``cache_config`` keys each long-context cache accepts (see :func:`make_cache` for defaults).
CACHE_CONFIG_KEYS = {"dynamic": (), "static": (), "sliding_window": ("window",),
                     "sinks": ("num_sink_tokens", "window"),
                     "quantized": ("nbits", "group_size", "residual_length")}
#: "argument not given" where ``None`` means something (``eos_token_id=None``: never stop early).
_UNSET = object()


@dataclass
class GenerateOutput:
    """What ``generate(..., output_logits=True)`` returns.

    ``sequences``: ``(B, P + n)`` prompt plus generated tokens.
    ``logits``: ``(B, n, V)`` the raw (unprocessed) logits each new token was chosen from.
    """

    sequences: torch.Tensor
    logits: torch.Tensor


def make_cache(config: ModelConfig, kind: str, batch_size: int, max_cache_len: Optional[int],
               layout: str = "bhsd", like: Optional[torch.Tensor] = None, **cache_config) -> Cache:
    """Build an empty cache of ``kind`` (one of :data:`CACHE_IMPLEMENTATIONS`) shaped for ``config``.

    ``like`` (a parameter of the model) gives the dtype and device.  A static cache
    preallocates ``n_layers * 2 * batch_size * n_kv_heads * max_cache_len * head_dim`` elements.
    The long-context caches take ``cache_config`` keys (anything else is an error):

    * ``"sliding_window"``: ``window`` (default ``config.sliding_window``, else ``max_seq_len``);
    * ``"sinks"``: ``num_sink_tokens`` (default 4) and ``window`` (default ``max_seq_len -
      num_sink_tokens``: the cache then never spans more positions than the model was trained on);
    * ``"quantized"``: ``nbits`` (8; or 4, 2), ``group_size`` (32 if it divides ``head_dim``,
      else ``head_dim``), ``residual_length`` (32 most recent tokens kept in full precision).
    """
    dtype = like.dtype if like is not None else torch.float32
    device = like.device if like is not None else None
    if kind in CACHE_CONFIG_KEYS:
        unknown = sorted(set(cache_config) - set(CACHE_CONFIG_KEYS[kind]))
        if unknown:
            raise ValueError(f"cache_config keys {unknown} are not used by cache_implementation={kind!r}; "
                             f"it accepts {list(CACHE_CONFIG_KEYS[kind]) or 'none'}")
    if kind in LONG_CONTEXT_CACHES and layout != "bhsd":
        raise ValueError(f"cache_implementation={kind!r} stores the 'bhsd' layout only, got layout={layout!r}")
    if kind == "sliding_window":
        return kv_cache.SlidingWindowKVCache(cache_config.get("window", config.sliding_window or config.max_seq_len))
    if kind == "sinks":
        sinks = cache_config.get("num_sink_tokens", 4)
        if "window" in cache_config:
            return kv_cache.SinkKVCache(sinks, cache_config["window"])
        context = config.sliding_window or config.max_seq_len
        default_window = context - (sinks if isinstance(sinks, int) and not isinstance(sinks, bool) else 0)
        if default_window < 1:
            raise ValueError(f"num_sink_tokens={sinks} leaves no room for the window: by default window = "
                             f"{'sliding_window' if config.sliding_window else 'max_seq_len'} {context} - "
                             f"num_sink_tokens; use num_sink_tokens < {context} or give cache_config['window']")
        return kv_cache.SinkKVCache(sinks, default_window)
    if kind == "quantized":
        hd = config.head_dim
        return kv_cache.QuantizedKVCache(nbits=cache_config.get("nbits", 8),
                                         group_size=cache_config.get("group_size", 32 if hd % 32 == 0 else hd),
                                         residual_length=cache_config.get("residual_length", 32))
    if kind == "dynamic":
        return kv_cache.DynamicKVCache(layout=layout)
    if kind == "static":
        if max_cache_len is None:
            raise ValueError("a static cache needs max_cache_len (prompt length + max_new_tokens)")
        return kv_cache.StaticKVCache(max_cache_len=max_cache_len, num_layers=config.n_layers, num_heads=config.n_heads,
                             num_kv_heads=config.n_kv_heads, head_dim=config.head_dim, max_batch_size=batch_size,
                             dtype=dtype, device=device, layout=layout)
    raise ValueError(f"cache_implementation={kind!r} is not known; expected one of {CACHE_IMPLEMENTATIONS} "
                     f"or a kv_cache.Cache object")


class _Stepper:
    """Hides the difference between the two models: ``step(ids, cache, mask, pos) -> (B, V)``
    logits of the last position.  The encoder-decoder model encodes the source once here."""

    def __init__(self, model, src=None, src_mask=None):
        self.model = model
        self.is_seq2seq = hasattr(model, "encode")
        if self.is_seq2seq:
            if src is None:
                raise ValueError("the encoder-decoder model needs `src` (the source token ids) to generate")
            self.src_mask = src_mask
            self.memory = model.encode(src, src_mask)
        elif src is not None:
            raise ValueError("`src` is only for the encoder-decoder model")

    def __call__(self, ids, cache, attention_mask, position_ids):
        if self.is_seq2seq:
            logits = self.model.decode(ids, self.memory, src_mask=self.src_mask, tgt_mask=attention_mask, cache=cache,
                                       position_ids=position_ids, num_logits_to_keep=1)
        else:
            logits = self.model(ids, cache=cache, attention_mask=attention_mask, position_ids=position_ids,
                                num_logits_to_keep=1)
        return logits[:, -1]


def check_token_ids(name: str, ids: torch.Tensor, vocab_size: int, vocab_name: str = "vocab_size") -> None:
    """Refuse ids outside ``[0, vocab_size)`` by value and place: the embedding would otherwise fail
    with torch's ``IndexError: index out of range in self`` (or a CUDA assert).  One host sync."""
    lo, hi = torch.stack(torch.aminmax(ids)).tolist()
    if lo >= 0 and hi < vocab_size:
        return
    bad = hi if hi >= vocab_size else lo
    where = (ids == bad).nonzero()[0].tolist()
    place = f" (row {where[0]}, position {where[1]})" if len(where) == 2 else ""
    raise ValueError(f"{name} holds token id {bad}{place}; expected ids in [0, {vocab_name}={vocab_size}) "
                     f"(padding positions too: they are embedded, then masked)")


def check_mask(name: str, mask, shape, left_padded: bool) -> None:
    """``mask``: 1 = real token, 0 = padding, of ``shape``; at least one 1 per row.  With
    ``left_padded`` each row must be 0s then 1s: generation appends new tokens after the last
    column, so a 0 after a 1 (right padding, a hole) would put a pad between prompt and answer
    and the first token would be read off a pad.  A few host syncs, once per call."""
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(shape):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must have the shape of its ids {tuple(shape)}, got {got}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        values = sorted(set(mask[(mask != 0) & (mask != 1)].flatten().tolist()))[:5]
        raise ValueError(f"{name} must hold only 0 (padding) and 1 (real token), got values {values}")
    real = mask != 0
    if not bool(real.any(-1).all()):
        row = int((~real.any(-1)).nonzero()[0, 0])
        raise ValueError(f"every row of {name} needs at least one real (1) token; row {row} has none")
    if left_padded and mask.shape[-1] > 1:
        holes = (real[:, :-1] & ~real[:, 1:]).any(-1)  # somewhere a 1 followed by a 0
        if bool(holes.any()):
            row = int(holes.nonzero()[0, 0])
            raise ValueError(f"{name} row {row} is {mask[row].long().tolist()}: a 0 after a 1 (right padding or a "
                             f"hole); generation expects left padding, each row's 0s before its 1s (pad prompts "
                             f"on the left, e.g. a tokenizer with padding_side='left')")


def _check_inputs(config: ModelConfig, input_ids, max_new_tokens, attention_mask, src=None, src_mask=None):
    """Every check of ``generate``'s inputs, once at entry (never inside the decode loop)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (batch, prompt_len) LongTensor, got {got}")
    B, P = input_ids.shape
    if P == 0:
        raise ValueError("input_ids must hold at least one token per row (got prompt length 0)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if P > config.max_seq_len:
        raise ValueError(f"prompt length {P} is longer than the model's context max_seq_len={config.max_seq_len}")
    if config.pos_encoding == "learned" and P + max_new_tokens > config.max_seq_len:
        raise ValueError(
            f"prompt length {P} + max_new_tokens {max_new_tokens} exceeds max_seq_len={config.max_seq_len}, "
            f"the size of this model's learned position table")
    check_token_ids("input_ids", input_ids, config.vocab_size)
    if attention_mask is not None:
        check_mask("attention_mask", attention_mask, (B, P), left_padded=True)
    if src is not None:
        if (not isinstance(src, torch.Tensor) or src.dim() != 2 or src.dtype != torch.long or src.shape[0] != B
                or src.shape[1] == 0):
            got = tuple(src.shape) if isinstance(src, torch.Tensor) else type(src).__name__
            raise ValueError(f"src must be a (batch={B}, src_len >= 1) LongTensor, got {got}")
        check_token_ids("src", src, config.src_vocab_size, "src_vocab_size")
        if src_mask is not None:  # the encoder sees the whole source at once: holes are harmless
            check_mask("src_mask", src_mask, tuple(src.shape), left_padded=False)


def _resolve_cache(model, stepper, cache_implementation, batch, max_len, src, cache_config=None):
    """Turn ``cache_implementation`` (a name or a Cache object) into an empty cache."""
    if cache_config and isinstance(cache_implementation, Cache):
        raise ValueError("cache_config configures a cache built by name; it cannot change the cache object passed")
    if isinstance(cache_implementation, Cache):
        cache = cache_implementation
        if cache.get_seq_length(0) != 0:
            raise ValueError("the cache passed to generate is not empty; call cache.reset() first")
        if stepper.is_seq2seq and not isinstance(cache, kv_cache.EncoderDecoderCache):
            raise ValueError("the encoder-decoder model needs an EncoderDecoderCache")
        return cache
    if stepper.is_seq2seq:
        if cache_config or cache_implementation in LONG_CONTEXT_CACHES:
            raise ValueError(f"cache_implementation={cache_implementation!r} / cache_config are for the decoder-only "
                             f"model; the encoder-decoder model takes 'dynamic' or 'static'")
        return model.new_cache(cache_implementation, batch, max_len, src_len=src.shape[1])
    return model.new_cache(cache_implementation, batch, max_len, **(cache_config or {}))


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    use_cache: bool = True,
    cache_implementation: Union[str, Cache] = "dynamic",
    cache_config: Optional[dict] = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_token_id=_UNSET,
    pad_token_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    attention_mask: Optional[torch.Tensor] = None,
    output_logits: bool = False,
    streamer: Optional[Callable[[torch.Tensor], None]] = None,
    src: Optional[torch.Tensor] = None,
    src_mask: Optional[torch.Tensor] = None,
    fast: bool = False,
    compile: bool = False,
):
    """Generate up to ``max_new_tokens`` tokens after ``input_ids`` ``(B, P)``.

    Args:
        use_cache: decode with a KV cache (default) or recompute the whole prefix each step.
        cache_implementation: ``"dynamic"``, ``"static"`` (preallocated for ``P +
            max_new_tokens``), the long-context caches ``"sliding_window"``, ``"sinks"``
            (StreamingLLM) and ``"quantized"``, or an empty ``kv_cache.Cache`` object to fill.
        cache_config: options of a cache built by name, e.g. ``{"window": 252,
            "num_sink_tokens": 4}`` or ``{"nbits": 4}``; see :func:`make_cache` for the keys
            and defaults.
        do_sample: sample (``True``) or take the argmax (``False``, greedy: the default, as in
            Hugging Face ``generate``).
        temperature, top_k, top_p: applied in that order when sampling (see
            :mod:`transformer.sampling`); ``temperature=0`` is greedy.  These, ``generator`` and
            ``eos_token_id`` are checked once, by :class:`~transformer.sampling.SamplingSettings`.
        eos_token_id: a row stops after producing it (or any id of a list); later positions of that row hold
            ``pad_token_id``.  Generation ends early once every row has stopped.  Defaults to
            ``model.config.eos_token_id``; pass ``None`` to never stop early.
        generator: a ``torch.Generator`` for reproducible sampling.
        attention_mask: ``(B, P)``, 1 = real token, 0 = left padding (each row 0s then 1s;
            right padding, holes and other values are refused with a ``ValueError``).
        output_logits: also return the logits of every step (:class:`GenerateOutput`).
        streamer: called with each new ``(B,)`` token tensor as soon as it is chosen.
        src, src_mask: the source of the encoder-decoder model.
        fast: decode with :class:`~transformer.fast_decode.FastDecoder`: a fixed-shape static
            cache and a step with no host sync (sampling on the device, EOS checked every 16
            steps, a ``streamer`` called in bursts); on CUDA the step is replayed as a CUDA
            graph.  Same tokens at temperature 0; decoder-only; no ``output_logits``.
        compile: ``fast`` plus ``torch.compile`` of the step (the first call of each batch size,
            length bucket and sampling setting compiles: seconds to a minute).

    Returns ``(B, P + n)`` LongTensor, ``n <= max_new_tokens`` (or a :class:`GenerateOutput`).
    Cost: one prefill over ``P`` tokens, then ``n`` single-token steps with a cache; without
    one, step ``t`` reprocesses all ``P + t`` tokens.
    """
    config = model.config
    # do_sample=None is greedy here, as False (Hugging Face's default), not "sample iff temperature > 0"
    settings = SamplingSettings(temperature, top_k, top_p, do_sample=bool(do_sample), generator=generator,
                                eos_token_id=config.eos_token_id if eos_token_id is _UNSET else eos_token_id)
    seq2seq = hasattr(model, "encode")
    _check_inputs(config, input_ids, max_new_tokens, attention_mask, src if seq2seq else None,
                  src_mask if seq2seq else None)
    eos_token_id = settings.eos_token_id
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else (first_eos(eos_token_id) or 0)
    B, P = input_ids.shape
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # no padding: take the mask-free fast path
    if fast or compile:
        from .fast_decode import fast_generate
        return fast_generate(model, input_ids, max_new_tokens, compile=compile, use_cache=use_cache,
                             cache_implementation=cache_implementation, cache_config=cache_config,
                             output_logits=output_logits, src=src, **settings.generate_kwargs(),
                             eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                             generator=generator, attention_mask=attention_mask, streamer=streamer)
    if attention_mask is not None:
        attention_mask = attention_mask.long()
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    else:
        position_ids = None

    was_training = model.training
    model.eval()
    try:  # restore the caller's train/eval mode even if a step or the streamer raises
        stepper = _Stepper(model, src, src_mask)
        cache = (_resolve_cache(model, stepper, cache_implementation, B, P + max_new_tokens, src, cache_config)
                 if use_cache else None)

        # One buffer for prompt + new tokens: appending a token is a write, not a reallocation.
        buffer = input_ids.new_empty(B, P + max_new_tokens)
        buffer[:, :P] = input_ids
        sequences = buffer[:, :P]
        all_logits = []
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        logits = stepper(input_ids, cache, attention_mask, position_ids)  # prefill: (B, V)
        for step in range(max_new_tokens):
            token = sample_next_token(logits, settings.do_sample, settings.temperature, settings.top_k,
                                      settings.top_p, generator)
            if eos_token_id is not None:
                token = token.masked_fill(finished, pad_token_id)
            if output_logits:
                all_logits.append(logits)
            buffer[:, P + step] = token
            sequences = buffer[:, :P + step + 1]
            if streamer is not None:
                streamer(token)
            if eos_token_id is not None:
                finished |= eos_hit(token, eos_token_id)
                if bool(finished.all()):
                    break
            if step == max_new_tokens - 1:
                break
            if attention_mask is not None:
                next_pos = attention_mask.sum(-1, keepdim=True)  # real tokens so far = the new one's position
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
                position_ids = torch.cat([position_ids, next_pos], dim=1)
            if cache is not None:  # decode one token through the cache
                step_pos = position_ids[:, -1:] if position_ids is not None else None
                logits = stepper(token[:, None], cache, attention_mask, step_pos)
            else:  # the reference: rerun the whole sequence
                logits = stepper(sequences, None, attention_mask, position_ids)
    finally:
        model.train(was_training)
    if output_logits:
        V = logits.shape[-1]
        stacked = torch.stack(all_logits, dim=1) if all_logits else logits.new_zeros(B, 0, V)
        return GenerateOutput(sequences.contiguous(), stacked)
    return sequences.contiguous()
