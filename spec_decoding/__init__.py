"""Speculative decoding: a cheap drafter proposes tokens, the target model verifies them in one pass.

The output is *exactly* what the target alone would produce: token for token at temperature 0,
and in distribution when sampling (the acceptance rule of Leviathan et al. 2023 / Chen et al.
2023, derived in :mod:`spec_decoding.rule`).  The gain is fewer sequential target passes: each
round costs one target pass and yields 1 to ``k + 1`` tokens.

* :func:`speculative_generate` -- ``(tokens, stats)`` for one prompt; :func:`format_stats`.
* :class:`SpeculativeDecoder` -- the same loop, round by round (``step()``), for inspection.
* :class:`ModelDrafter` / :class:`PromptLookupDrafter` -- the two drafters (:class:`Drafter`).
* :class:`SpecDecodingPair` -- draft + target model as one module, with cache statistics.
* :func:`make_demo_pair` / :func:`truncated_draft` -- a draft cut from the target's first layers.
* :mod:`spec_decoding.rule` -- the acceptance rule on plain probability vectors.

Both models' KV caches are rolled back with ``rollback`` after every round (``kv_cache``).
"""

from .decoder import RoundResult, SpecDecodingStats, SpeculativeDecoder, format_stats, speculative_generate
from .demo_models import make_demo_pair, truncated_draft
from .drafters import Drafter, ModelDrafter, PromptLookupDrafter, Proposal, find_ngram_continuation
from .pair import SpecDecodingConfig, SpecDecodingPair, cache_stats
from .rule import (SamplingSettings, acceptance_probability, position_output_distribution, probs_from_logits,
                   residual_distribution, verify_greedy, verify_sampled)

__all__ = [
    "speculative_generate", "format_stats", "SpeculativeDecoder", "SpecDecodingStats", "RoundResult",
    "Drafter", "ModelDrafter", "PromptLookupDrafter", "Proposal", "find_ngram_continuation",
    "SpecDecodingPair", "SpecDecodingConfig", "cache_stats", "make_demo_pair", "truncated_draft",
    "SamplingSettings", "probs_from_logits", "acceptance_probability", "residual_distribution",
    "position_output_distribution", "verify_sampled", "verify_greedy",
]
