"""``SpecDecodingPair``: a draft model and a target model packaged as one module.

The object-style API of the speculative decoding guide (``SpecDecodingPair``,
``generate_draft_sequence``, ``verify_draft_with_target``, ``process_acceptance_and_resampling``,
``get_comprehensive_stats``), built on :class:`spec_decoding.decoder.SpeculativeDecoder`.  Use it
when you want the two models and their settings kept together and the caches' statistics
available after a run; use :func:`spec_decoding.speculative_generate` for a one-off call.

The three "phase" methods run one round *without* caches (each call recomputes its prefix),
so a reader can watch a single draft / verify / accept step on concrete tensors.  ``generate``
is the real, cached loop.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from transformer.generation import check_token_ids
from .decoder import SpecDecodingStats, SpeculativeDecoder
from .rule import SamplingSettings, probs_from_logits, verify_sampled


@dataclass
class SpecDecodingConfig:
    """Settings of a :class:`SpecDecodingPair` (every field can be overridden per ``generate`` call).

    ``num_draft_tokens`` is the guide's ``draft_steps``: drafts proposed per round.
    The others are the keyword arguments of :class:`~spec_decoding.decoder.SpeculativeDecoder`.
    """

    num_draft_tokens: int = 4
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    cache_implementation: str = "dynamic"
    adaptive: bool = False
    max_draft_tokens: Optional[int] = None


def cache_stats(cache, forward_passes: int) -> Dict[str, Any]:
    """What a cache holds after a run: type, tokens stored, capacity, bytes allocated, passes."""
    if cache is None:
        return {"cache_type": None, "seq_length": 0, "max_cache_len": None, "memory_bytes": 0,
                "forward_passes": forward_passes}
    return {"cache_type": type(cache).__name__, "seq_length": cache.get_seq_length(),
            "max_cache_len": cache.get_max_cache_shape(), "memory_bytes": cache.memory_bytes(),
            "forward_passes": forward_passes}


class SpecDecodingPair(nn.Module):
    """A draft and a target model that generate together by speculative decoding.

    Args:
        draft_model: the small model that proposes tokens (same vocabulary as the target).
        target_model: the model whose output distribution is reproduced exactly.
        num_draft_tokens: drafts per round (``k``).
        config: a :class:`SpecDecodingConfig`; keyword ``overrides`` replace its fields.

    ``generate(input_ids, max_new_tokens, **overrides)`` returns ``(1, P + n)`` tokens and
    keeps the run's :class:`~spec_decoding.decoder.SpecDecodingStats` in ``last_stats``;
    ``get_comprehensive_stats()`` reports both caches and the acceptance counters.
    """

    def __init__(self, draft_model: nn.Module, target_model: nn.Module, num_draft_tokens: int = 4,
                 config: Optional[SpecDecodingConfig] = None, **overrides):
        super().__init__()
        if draft_model.config.vocab_size != target_model.config.vocab_size:
            raise ValueError(f"draft vocab_size={draft_model.config.vocab_size} does not match target "
                             f"vocab_size={target_model.config.vocab_size}; the two models must share a vocabulary")
        self.draft_model = draft_model
        self.target_model = target_model
        base = asdict(config) if config is not None else {"num_draft_tokens": num_draft_tokens}
        base.update(overrides)
        self.config = SpecDecodingConfig(**base)
        self.last_stats: Optional[SpecDecodingStats] = None
        self._decoder: Optional[SpeculativeDecoder] = None

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **overrides) -> torch.Tensor:
        """Speculative generation with the pair's settings (``overrides`` for this call only).

        Extra keywords (``generator``, ``seed``, ``eos_token_id``, ``streamer``, ``do_sample``)
        pass through to :class:`~spec_decoding.decoder.SpeculativeDecoder`.
        """
        kwargs = asdict(self.config)
        kwargs.update(overrides)
        self._decoder = SpeculativeDecoder(self.target_model, self.draft_model, input_ids, max_new_tokens, **kwargs)
        tokens = self._decoder.run()
        self.last_stats = self._decoder.stats
        return tokens

    def forward(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """``pair(x, n)``: the guide's call style for ``generate(x, n)``."""
        return self.generate(x, n)

    # ------------------------------------------------------- one round, phase by phase
    def _settings(self) -> SamplingSettings:
        return SamplingSettings(self.config.temperature, self.config.top_k, self.config.top_p)

    @torch.no_grad()
    def generate_draft_sequence(self, input_ids: torch.Tensor, num_tokens: Optional[int] = None,
                                generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Phase 1: the draft model proposes ``num_tokens`` (default ``k``) tokens after ``input_ids`` ``(1, L)``.

        Returns ``(draft_tokens (1, k), draft_probs (1, k, V))``.  Uses a fresh cache each call.
        """
        from .drafters import ModelDrafter
        k = self.config.num_draft_tokens if num_tokens is None else num_tokens
        check_token_ids("input_ids", input_ids, self.draft_model.config.vocab_size)
        drafter = ModelDrafter(self.draft_model)
        drafter.reset(input_ids, input_ids.shape[1] + k, "dynamic")
        prop = drafter.propose(input_ids, k, self._settings(), generator)
        probs = prop.probs if prop.probs is not None else F.one_hot(prop.tokens, self.draft_model.config.vocab_size).float()
        return prop.tokens[None], probs[None]

    @torch.no_grad()
    def verify_draft_with_target(self, input_ids: torch.Tensor, draft_tokens: torch.Tensor) -> torch.Tensor:
        """Phase 2: one target pass over ``input_ids + draft_tokens``; returns ``p`` ``(1, k + 1, V)``.

        Row ``i`` is the target's distribution for draft ``i``; the last row is the bonus position.
        """
        k = draft_tokens.shape[-1]
        check_token_ids("input_ids", input_ids, self.target_model.config.vocab_size)
        check_token_ids("draft_tokens", draft_tokens, self.target_model.config.vocab_size)
        logits = self.target_model(torch.cat([input_ids, draft_tokens.view(1, k)], dim=1), num_logits_to_keep=k + 1)
        return probs_from_logits(logits[0], self._settings())[None]

    def process_acceptance_and_resampling(self, draft_probs: torch.Tensor, target_probs: torch.Tensor,
                                          draft_tokens: torch.Tensor,
                                          generator: Optional[torch.Generator] = None) -> Tuple[int, int]:
        """Phase 3: the acceptance rule; returns ``(n_accepted, next_token)`` (see :mod:`spec_decoding.rule`)."""
        return verify_sampled(target_probs.reshape(-1, target_probs.shape[-1]),
                              draft_probs.reshape(-1, draft_probs.shape[-1]), draft_tokens.reshape(-1), generator)

    # ------------------------------------------------------------------ statistics
    def get_comprehensive_stats(self) -> Dict[str, Any]:
        """Both models' cache statistics after the last ``generate`` plus the acceptance counters.

        ``{"draft_model_cache": {...}, "target_model_cache": {...}, "speculation": {...}}``; each
        cache entry has ``cache_type``, ``seq_length``, ``max_cache_len``, ``memory_bytes`` and
        ``forward_passes``.
        """
        dec, stats = self._decoder, self.last_stats or SpecDecodingStats()
        return {
            "draft_model_cache": cache_stats(dec.drafter.cache if dec else None, stats.draft_forward_passes),
            "target_model_cache": cache_stats(dec.target_cache if dec else None, stats.target_forward_passes),
            "speculation": stats.to_dict(),
        }
