"""Drafters: whatever proposes the next few tokens for the target model to verify.

The decoder (:mod:`spec_decoding.decoder`) needs three things from a drafter, the
:class:`Drafter` protocol:

``reset(input_ids, max_len, cache_implementation)``
    Forget the previous request; ``max_len`` bounds the sequence (prompt + new tokens).
``propose(tokens, k, settings, generator) -> Proposal``
    Given the accepted sequence ``tokens`` ``(1, L)``, guess up to ``k`` next tokens and say
    which distribution ``q`` each was drawn from (``None`` = a point mass on the guess).
``rollback(length)``
    Only the first ``length`` tokens of the sequence are final (the target rejected the
    rest): drop any state built on later tokens.

Two drafters are provided:

* :class:`ModelDrafter` -- a small language model with its own KV cache (classic speculative
  decoding).  ``k`` drafts cost ``k`` cheap forward passes.
* :class:`PromptLookupDrafter` -- no model at all: if the last ``n`` tokens already occurred
  earlier in the context, propose the tokens that followed them (Saxena 2023, "prompt lookup
  decoding").  Free to run; strong when the output copies the input (code edits, quoting,
  summaries, repeated text).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, runtime_checkable

import torch

from .rule import SamplingSettings, probs_from_logits


@dataclass
class Proposal:
    """Drafted tokens ``(m,)`` (``m <= k``, may be 0) and their draft distributions ``(m, V)``.

    ``probs is None`` means each token was proposed with certainty (``q`` a point mass): prompt
    lookup, and any drafter decoding greedily.
    """

    tokens: torch.Tensor
    probs: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


@runtime_checkable
class Drafter(Protocol):
    """Anything that proposes tokens for speculative decoding (see the module docstring)."""

    name: str
    #: forward passes of a draft model since the last ``reset`` (0 for model-free drafters)
    forward_passes: int
    #: the drafter's vocabulary size, or ``None`` if it copies tokens (any vocabulary works)
    vocab_size: Optional[int]

    def reset(self, input_ids: torch.Tensor, max_len: int, cache_implementation: str) -> None: ...

    def propose(self, tokens: torch.Tensor, k: int, settings: SamplingSettings,
                generator: Optional[torch.Generator] = None) -> Proposal: ...

    def rollback(self, length: int) -> None: ...


def _empty(device) -> Proposal:
    return Proposal(torch.zeros(0, dtype=torch.long, device=device), None)


class ModelDrafter:
    """A draft language model that proposes ``k`` tokens one at a time from its own KV cache.

    Args:
        model: a ``DecoderOnlyTransformer`` sharing the target's vocabulary.
        fast: run the draft's steps through a :class:`~transformer.fast_decode.FastDecoder`
            (a fixed-shape static cache and a lean one-token step) instead of the model's
            ordinary forward.
        compile: ``fast`` with the one-token step ``torch.compile``'d (seconds to compile, once
            per model and cache size; kept on the model between calls).  Greedy drafting runs
            all ``k`` steps of a round as one compiled function; only a request's first draft
            length builds one (up to a minute for k=8), see :meth:`_one_call_length`.

    Why ``compile`` matters: speculative decoding pays ``k`` draft steps per round, so it only
    wins if a draft step is much cheaper than a target step.  A small model in eager PyTorch is
    not: its step is dominated by per-operator overhead, not arithmetic (the 0.9M-parameter
    draft preset takes 0.38 ms eager against 1.5 ms for the 4.2M target on one CPU core).
    Compiled, the draft's step fuses into a few kernels: 0.12 ms.

    Cache bookkeeping: the cache holds keys/values for a prefix of the accepted sequence.  At
    the start of :meth:`propose` every token the cache has not seen yet is fed -- the whole
    prompt in the first round, usually just the last accepted token afterwards, and two tokens
    after a fully accepted round (the last draft, which the drafter sampled but never fed, and
    the target's bonus token).  Each further draft is one single-token pass.  :meth:`rollback`
    rolls the cache back to the accepted prefix (with ``fast`` it only moves the write position:
    slots past it are masked and later overwritten).

    Cost per round of ``k`` drafts: ``k`` forward passes of the draft model.
    """

    def __init__(self, model: torch.nn.Module, *, fast: bool = False, compile: bool = False):
        if not hasattr(model, "config") or not hasattr(model, "new_cache"):
            raise TypeError(f"ModelDrafter needs a DecoderOnlyTransformer-like model (with .config and .new_cache), "
                            f"got {type(model).__name__}")
        for name, v in (("fast", fast), ("compile", compile)):
            if not isinstance(v, bool):
                raise TypeError(f"{name} must be a bool, got {v!r}")
        self.model = model
        self.fast, self.compile = fast or compile, compile
        self.vocab_size = model.config.vocab_size
        mode = " compiled" if compile else (" fast" if fast else "")
        self.name = f"draft model ({sum(p.numel() for p in model.parameters()) / 1e6:.3g}M params{mode})"
        self.cache = None  # the draft's KV cache (a Cache; with ``fast``, the FastDecoder's)
        self.decoder = None  # the FastDecoder (``fast`` only)
        self.length = 0  # tokens the cache holds (a prefix of the sequence)
        self.forward_passes = 0

    def reset(self, input_ids, max_len, cache_implementation="dynamic"):
        cfg = self.model.config
        if cfg.pos_encoding == "learned" and max_len > cfg.max_seq_len:
            raise ValueError(f"prompt + max_new_tokens = {max_len} exceeds the draft model's max_seq_len="
                             f"{cfg.max_seq_len} (its learned position table); generate fewer tokens")
        if self.fast:
            from transformer.fast_decode import get_fast_decoder  # the fast path is the model's business

            self.decoder = get_fast_decoder(self.model, input_ids.shape[0], max_len, self.compile, role="draft")
            self.decoder.prepare()
            self.cache = self.decoder.cache
        else:
            self.cache = self.model.new_cache(cache_implementation, input_ids.shape[0], max_len)
        self.length = 0
        self.forward_passes = 0

    def _logits(self, feed: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``(B, V)`` after feeding ``feed`` ``(B, S)`` at position ``self.length``."""
        if self.fast:
            logits = self.decoder.logits_at(feed, self.length)
        else:
            logits = self.model(feed, cache=self.cache, num_logits_to_keep=1)[:, -1]
        self.length += feed.shape[1]
        self.forward_passes += 1
        return logits

    @torch.no_grad()
    def propose(self, tokens, k, settings, generator=None):
        if k <= 0:
            return _empty(tokens.device)
        feed = tokens[:, self.length:]  # what the cache has not seen (>= 1 token)
        probs = []
        k_run = self._one_call_length(k, feed.shape[1]) if self.fast and settings.greedy else None
        if k_run is not None:  # all k greedy steps in one call (one compiled graph)
            drafted = self.decoder.greedy_draft(feed, self.length, k_run)[0][:k]  # (k,)
            self.length += feed.shape[1] - 1 + k
            self.forward_passes += k_run + int(feed.shape[1] > 1)  # + one catch-up call for the missed tokens
        else:
            drafted = []
            for _ in range(k):
                logits = self._logits(feed)  # (1, V)
                if settings.greedy:  # q is a point mass on the argmax: no need to store it
                    x = logits.argmax(-1)
                else:
                    q = probs_from_logits(logits, settings)  # (1, V)
                    x = torch.multinomial(q, 1, generator=generator).squeeze(-1)
                    probs.append(q)
                drafted.append(x)
                feed = x[:, None]
            drafted = torch.cat(drafted)
        if self.fast:  # host bookkeeping, so that cache.get_seq_length() / get() tell the truth
            self.cache.set_seq_length(self.length)
        return Proposal(drafted, torch.cat(probs) if probs else None)

    def _one_call_length(self, k: int, n_feed: int) -> Optional[int]:
        """How many greedy steps to run in one :meth:`FastDecoder.greedy_draft` call for ``k``
        drafts, or ``None`` for ``k`` single steps.

        Compiled, every draft length is its own graph, and building one takes seconds to a
        minute (the ``k`` steps are unrolled: 10 s for k=3, 60 s for k=8 on the 2-core CPU).
        So only the first round of a request may compile a new length.  A later, shorter
        length (the last rounds, where fewer tokens remain; an adaptive draft that shrank)
        runs a longer compiled function and keeps the first ``k`` guesses (the extra ones land
        in cache slots past the accepted length: masked, then overwritten); a longer one (an
        adaptive draft that grew) takes ``k`` single compiled steps.  Uncompiled, any length
        is free."""
        if not self.compile:
            return k
        have = self.decoder.greedy_draft_lengths()
        if k in have or self.forward_passes == 0:  # no draft step yet: the request's first round
            return k
        room = self.decoder.max_cache_len - (self.length + n_feed - 1)  # slots the call may write
        usable = [j for j in have if k <= j <= room]
        return min(usable) if usable else None

    def rollback(self, length):
        self.length = min(length, self.length)
        if self.cache is not None:
            self.cache.rollback(self.length)  # FixedShapeKVCache: moves the host-side length only


def find_ngram_continuation(tokens: torch.Tensor, k: int, max_ngram: int = 3, min_ngram: int = 1) -> torch.Tensor:
    """Prompt lookup: ``k`` tokens that followed the most recent earlier match of the context's tail.

    For ``n = max_ngram`` down to ``min_ngram``: look for the last ``n`` tokens of ``tokens``
    (1-D, length ``L``) at an earlier place (a match that ends before the last token), take the
    most recent such match, and copy the ``k`` tokens that followed it.  Longer matches are
    tried first because they predict better.  Returns a 1-D LongTensor (empty: no match).

    The copy may run into the present: a match ``D`` tokens back says "the text repeats with
    period ``D``", so the copy continues with the tokens it has just proposed (as an LZ77 copy
    with overlap does).  A run ``[4 4 4]`` thus proposes ``[4 4 4 4 ...]``, not just one ``4``.

    Example: ``[5 7 9 2 5 7]`` with ``max_ngram=2`` -> the tail ``[5 7]`` occurred at
    position 0 -> propose ``[9 2 5 7 9 ...]``.  Cost: ``O(L * max_ngram)`` comparisons.
    """
    L = tokens.shape[0]
    for n in range(min(max_ngram, L - 1), min_ngram - 1, -1):
        windows = tokens[:L - 1].unfold(0, n, 1)  # every window that ends before the last token
        hits = (windows == tokens[L - n:]).all(-1).nonzero()
        if hits.numel():
            src = int(hits[-1]) + n  # first token after the match (<= L - 1)
            period = L - src
            return tokens[src + torch.arange(k, device=tokens.device) % period]
    return tokens[:0]


class PromptLookupDrafter:
    """Model-free drafter: propose the continuation of an earlier occurrence of the last n-gram.

    Args:
        max_ngram: longest tail to look up (tried first).
        min_ngram: shortest tail still trusted (1 = a single repeated token is enough).

    The proposal is a point mass (``q = onehot``), so verification accepts a guess ``x`` with
    probability ``p(x)`` and on rejection samples ``p`` with ``x`` removed (see
    :mod:`spec_decoding.rule`); at temperature 0 a guess is kept iff it is the target's argmax.
    Cost: no forward pass; a search over the context per round.
    """

    vocab_size = None

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        for name, v in (("max_ngram", max_ngram), ("min_ngram", min_ngram)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if min_ngram > max_ngram:
            raise ValueError(f"min_ngram={min_ngram} must be <= max_ngram={max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.name = f"prompt lookup (n-gram {min_ngram}..{max_ngram})"
        self.forward_passes = 0

    def reset(self, input_ids, max_len, cache_implementation="dynamic"):
        self.forward_passes = 0

    def propose(self, tokens, k, settings, generator=None):
        if k <= 0:
            return _empty(tokens.device)
        return Proposal(find_ngram_continuation(tokens[0], k, self.max_ngram, self.min_ngram), None)

    def rollback(self, length):
        pass  # stateless: the context itself is the "cache"
