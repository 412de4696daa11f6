"""Every Python example of reference document 004 ("Advanced KV Cache Integration Guide") runs
here as written, and gives right answers.

Each example of ``../shared/seeds/004_*.txt`` is copied between ``# --- document 004, "<section>"``
and ``# --- end``.  Only its import lines are adapted: ``from transformer.kv_cache_v2 import ...``
-> ``from kv_cache import ...``.  Names an example uses but the document never defines are
provided by this file under a comment saying so, as small as possible:
``TransformerModelConfig`` (a dataclass of the fields the examples read), ``TransformerLayerV2``
(a pre-norm block: the document's attention + an MLP), ``SpecDecodingConfig``, the model's
``generate_next_token_embedding_and_logits`` (greedy next token over a tied vocabulary of
``VOCAB`` embeddings), and the three methods ``SpecDecodingPairV2`` calls but does not show
(``verify_draft_with_target``, ``process_acceptance_and_resampling``,
``assemble_final_sequence``: greedy acceptance).

What is proved, example by example:

* "Step 1" (``MultiHeadAttentionV2`` on ``CachedAttentionMixin``): fed a growing input with
  ``expanding_context=True`` it returns what ``expanding_context=False`` returns at every
  length, and the manager holds exactly that sequence's tokens once (``set_cache`` replaces, it
  does not append duplicates); a rollback (a shorter input) and an eviction between steps stay
  right (``_get_cached_kv`` misses, the whole K/V is recomputed and stored: a deliberate
  restart).
* "Step 2" (``AutoregressiveTransformerModelV2``): per-sequence caches through
  ``set_cache(cache, sequence_id)``, ``get_cache_stats`` and ``clear_cache`` are right.  The
  document's attention has **no causal mask**, so with two or more layers a step-by-step cache
  is *not* the same computation as one uncached pass over the whole input: the deeper layers'
  cached keys were computed when later tokens did not exist yet.  What the cache computes is a
  prefix-LM (the prompt sees itself whole, each later token sees the tokens before it):
  :func:`reference_forward` computes that from the same weights, and the newest token's output
  equals it at every step.  This is a property of the document's attention, not of the cache
  (this project's own attention is causal; see ``test_memory_manager_generate.py``).
* "Step 3" (``SpecDecodingPairV2``): the cache configuration parts as written
  (``create_cache_config_for_speculative_decoding``, the policy mutations, ``optimize_memory``,
  the statistics), and ``forward`` with the greedy acceptance this file supplies: its output
  equals greedy decoding of the target alone.  The document never rolls the draft's cache back
  after a rejection; the supplied ``assemble_final_sequence`` does (``crop_sequence``), else the
  draft would read the keys of rejected tokens, and the test checks the draft cache then holds
  exactly the accepted tokens' keys.
* "Cache Performance Metrics" (``CachePerformanceMonitor`` as written) on a real cache: every
  number it reports is recomputed by hand.
* "Production Configurations": all three are valid and their pools never pass
  ``memory_limit_mb``.  Two facts the numbers imply are pinned down: the LLM preset's 2 GiB holds
  1360 float32 tokens (one token of 48 layers x 4096 wide is 1.5 MiB), less than one
  ``max_sequence_length=4096`` sequence; the research preset's reservations (96 MiB per
  sequence) fit 5 of its ``max_batch_size=16`` sequences, and the 6th is refused with an error.
* "Testing and Validation": ``test_advanced_cache_integration`` runs as written (it is collected
  by pytest under its own name) and, replayed with every read checked, each ``get_cache``
  returns exactly the tensors the last ``set_cache`` stored.
* "Migration Guide": the three fragments; ``CacheConfig(...)`` with the document's literal
  ``...`` placeholder is refused by Python (missing arguments), and runs once it is filled in.
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kv_cache
from kv_cache import AdvancedKVCache, CacheConfig, EvictionPolicy, PoolExhaustedError

MiB = 2 ** 20


def _seed(n: int) -> None:
    torch.manual_seed(n)


# ============================================================================ the document's classes
# --- document 004, "Step 1: Update Attention Mechanisms" (import adapted: transformer.kv_cache_v2 -> kv_cache)
# transformer/attention/mha_v2.py
from kv_cache import CachedAttentionMixin, AdvancedKVCache

class MultiHeadAttentionV2(CachedAttentionMixin, nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, layer_id: int = 0, **kwargs):
        super().__init__()
        self.layer_id = layer_id
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads

        # Existing attention components
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=False)

    def forward(
        self,
        query: torch.Tensor,
        key: Optional[torch.Tensor] = None,
        value: Optional[torch.Tensor] = None,
        expanding_context: bool = False,
        sequence_id: str = "default"
    ) -> torch.Tensor:

        batch_size, seq_len, _ = query.shape

        # Self-attention case
        if key is None:
            key = value = query

        # Project inputs
        q = self.q_proj(query).view(batch_size, seq_len, self.num_heads, self.head_dim).transpose(1, 2)

        if expanding_context and self.kv_cache:
            # Try to get cached K, V
            cached_kv = self._get_cached_kv(self.layer_id, seq_len)

            if cached_kv is not None:
                # Cache hit - use cached K, V and only compute for new tokens
                cached_k, cached_v = cached_kv

                # Reshape cached tensors
                k_cached = cached_k.view(batch_size, -1, self.num_heads, self.head_dim).transpose(1, 2)
                v_cached = cached_v.view(batch_size, -1, self.num_heads, self.head_dim).transpose(1, 2)

                # Compute only new K, V if sequence extended
                if seq_len > k_cached.size(2):
                    new_tokens = key[:, k_cached.size(2):, :]
                    k_new = self.k_proj(new_tokens).view(batch_size, -1, self.num_heads, self.head_dim).transpose(1, 2)
                    v_new = self.v_proj(new_tokens).view(batch_size, -1, self.num_heads, self.head_dim).transpose(1, 2)

                    k = torch.cat([k_cached, k_new], dim=2)
                    v = torch.cat([v_cached, v_new], dim=2)

                    # Update cache with extended K, V
                    k_flat = k.transpose(1, 2).contiguous().view(batch_size, -1, self.embed_dim)
                    v_flat = v.transpose(1, 2).contiguous().view(batch_size, -1, self.embed_dim)
                    self._cache_kv(self.layer_id, k_flat, v_flat)
                else:
                    k, v = k_cached, v_cached
            else:
                # Cache miss - compute full K, V
                k = self.k_proj(key).view(batch_size, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
                v = self.v_proj(value).view(batch_size, seq_len, self.num_heads, self.head_dim).transpose(1, 2)

                # Cache the computed K, V
                k_flat = k.transpose(1, 2).contiguous().view(batch_size, seq_len, self.embed_dim)
                v_flat = v.transpose(1, 2).contiguous().view(batch_size, seq_len, self.embed_dim)
                self._cache_kv(self.layer_id, k_flat, v_flat)
        else:
            # No caching - compute K, V normally
            k = self.k_proj(key).view(batch_size, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
            v = self.v_proj(value).view(batch_size, seq_len, self.num_heads, self.head_dim).transpose(1, 2)

        # Scaled dot-product attention
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        attn_weights = F.softmax(scores, dim=-1)
        attn_output = torch.matmul(attn_weights, v)

        # Reshape and project output
        attn_output = attn_output.transpose(1, 2).contiguous().view(batch_size, seq_len, self.embed_dim)
        return self.out_proj(attn_output)
# --- end

# --- document 004, "Step 2: Update Transformer Models" (import adapted: transformer.kv_cache_v2 -> kv_cache)
# transformer/transformer_model_v2.py
from kv_cache import AdvancedKVCache, CacheConfig

class AutoregressiveTransformerModelV2(nn.Module):
    def __init__(self, config: TransformerModelConfig):
        super().__init__()
        self.config = config

        # Initialize advanced KV cache
        self.cache_config = CacheConfig(
            max_batch_size=config.decode_config.max_batch_size if hasattr(config.decode_config, 'max_batch_size') else 32,
            max_sequence_length=config.max_seq_len,
            embed_dim=config.embed_dim,
            num_heads=config.num_heads,
            num_layers=config.num_layers,
            eviction_policy=EvictionPolicy.SLIDING_WINDOW,
            sliding_window_size=config.max_seq_len // 2,
            memory_limit_mb=200,  # Configurable based on available memory
            preallocate_memory=True,
        )

        self.kv_cache = AdvancedKVCache(self.cache_config) if config.decode_config.use_kv_cache else None

        # Model layers with cache-aware attention
        self.layers = nn.ModuleList([
            TransformerLayerV2(
                embed_dim=config.embed_dim,
                num_heads=config.num_heads,
                layer_id=i,
                kv_cache=self.kv_cache
            ) for i in range(config.num_layers)
        ])

    def forward(self, x: torch.Tensor, expanding_context: bool = False, sequence_id: str = "default") -> torch.Tensor:
        # Set sequence ID for all layers
        if self.kv_cache:
            for layer in self.layers:
                layer.attention.set_cache(self.kv_cache, sequence_id)

        # Forward pass through layers
        for layer in self.layers:
            x = layer(x, expanding_context=expanding_context)

        return x

    def get_cache_stats(self) -> Dict:
        """Get comprehensive cache statistics."""
        if self.kv_cache:
            return self.kv_cache.get_global_stats()
        return {}

    def clear_cache(self, sequence_id: Optional[str] = None):
        """Clear cache for specific sequence or all sequences."""
        if self.kv_cache:
            if sequence_id:
                self.kv_cache.clear_sequence(sequence_id)
            else:
                self.kv_cache.clear_all()
# --- end

# --- document 004, "Step 3: Enhanced Speculative Decoding" (import adapted: transformer.kv_cache_v2 -> kv_cache)
# transformer/spec_decoding_v2.py
from kv_cache import create_cache_config_for_speculative_decoding

class SpecDecodingPairV2(nn.Module):
    def __init__(self, spec_config: SpecDecodingConfig):
        super().__init__()
        self.config = spec_config

        # Create optimized cache configurations
        draft_cache_config, target_cache_config = create_cache_config_for_speculative_decoding()

        # Initialize models with advanced caching
        self.draft_model = AutoregressiveTransformerModelV2(spec_config.draft_config)
        self.target_model = AutoregressiveTransformerModelV2(spec_config.target_config)

        # Configure caches for speculative decoding patterns
        if self.draft_model.kv_cache:
            # Draft model benefits from aggressive caching
            self.draft_model.kv_cache.config.eviction_policy = EvictionPolicy.SLIDING_WINDOW
            self.draft_model.kv_cache.config.sliding_window_size = 256

        if self.target_model.kv_cache:
            # Target model uses minimal caching (or none)
            self.target_model.kv_cache.config.eviction_policy = EvictionPolicy.NONE

    def forward(self, x: torch.Tensor, n: int, batch_sequence_ids: Optional[List[str]] = None) -> torch.Tensor:
        """Enhanced forward pass with batch sequence tracking."""
        current_output = x.clone()
        batch_size = x.size(0)

        # Generate unique sequence IDs for batch processing
        if batch_sequence_ids is None:
            batch_sequence_ids = [f"batch_{i}_{int(time.time())}" for i in range(batch_size)]

        iteration = 0
        while (current_output.size(1) - x.size(1)) < n:
            print(f"Speculative decoding iteration: {iteration}")

            # Phase 1: Draft generation with per-sequence caching
            draft_sequences = []
            draft_probs_list = []

            for i, seq_id in enumerate(batch_sequence_ids):
                single_input = current_output[i:i+1]  # Single sequence
                draft_seq, draft_probs = self.generate_draft_sequence(single_input, seq_id)
                draft_sequences.append(draft_seq)
                draft_probs_list.append(draft_probs)

            # Combine batch results
            draft_sequence = torch.cat(draft_sequences, dim=0)
            draft_probs = torch.cat(draft_probs_list, dim=0)

            # Phase 2: Target verification (parallel processing, minimal caching)
            full_sequence = torch.cat([current_output, draft_sequence], dim=1)
            target_probs = self.verify_draft_with_target(full_sequence, "target_verification")

            # Phase 3 & 4: Acceptance and resampling
            final_count, resampled_embeddings = self.process_acceptance_and_resampling(
                draft_probs, target_probs, draft_sequence
            )

            # Update current output
            current_output = self.assemble_final_sequence(
                current_output, draft_sequence, final_count, resampled_embeddings
            )

            iteration += 1

            # Periodically optimize cache memory
            if iteration % 5 == 0:
                self.optimize_cache_memory()

        return current_output

    def generate_draft_sequence(self, x: torch.Tensor, sequence_id: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """Generate draft sequence with sequence-specific caching."""
        generated_embeddings = []
        generated_logits = []
        current_sequence = x.clone()

        for step in range(self.config.draft_steps):
            # Use sequence-specific caching
            embedding, logits = self.draft_model.generate_next_token_embedding_and_logits(
                current_sequence, expanding_context=True, sequence_id=sequence_id
            )
            generated_embeddings.append(embedding)
            generated_logits.append(logits)
            current_sequence = torch.cat([current_sequence, embedding], dim=1)

        draft_sequence = torch.cat(generated_embeddings, dim=1)
        draft_logits = torch.cat(generated_logits, dim=1)
        draft_probs = torch.softmax(draft_logits, dim=-1)

        return draft_sequence, draft_probs

    def optimize_cache_memory(self):
        """Trigger memory optimization across both models."""
        if self.draft_model.kv_cache:
            self.draft_model.kv_cache.optimize_memory()
        if self.target_model.kv_cache:
            self.target_model.kv_cache.optimize_memory()

    def get_comprehensive_stats(self) -> Dict:
        """Get detailed statistics for both models."""
        return {
            "draft_model_cache": self.draft_model.get_cache_stats(),
            "target_model_cache": self.target_model.get_cache_stats(),
        }
# --- end

# --- document 004, "Cache Performance Metrics"
class CachePerformanceMonitor:
    def __init__(self, cache: AdvancedKVCache):
        self.cache = cache
        self.metrics_history = []

    def collect_metrics(self) -> Dict:
        """Collect comprehensive performance metrics."""
        stats = self.cache.get_global_stats()

        metrics = {
            "timestamp": time.time(),
            "hit_rate": stats["global_hit_rate"],
            "memory_usage_mb": stats["total_memory_mb"],
            "evictions": stats["total_evictions"],
            "memory_pool_efficiency": stats["memory_pool"]["pool_hit_rate"],
        }

        self.metrics_history.append(metrics)
        return metrics

    def analyze_performance(self) -> Dict:
        """Analyze cache performance trends."""
        if len(self.metrics_history) < 2:
            return {"status": "insufficient_data"}

        recent = self.metrics_history[-10:]  # Last 10 measurements

        avg_hit_rate = sum(m["hit_rate"] for m in recent) / len(recent)
        avg_memory = sum(m["memory_usage_mb"] for m in recent) / len(recent)

        hit_rate_trend = "stable"
        if len(recent) >= 3:
            if recent[-1]["hit_rate"] > recent[-3]["hit_rate"] + 0.1:
                hit_rate_trend = "improving"
            elif recent[-1]["hit_rate"] < recent[-3]["hit_rate"] - 0.1:
                hit_rate_trend = "degrading"

        return {
            "avg_hit_rate": avg_hit_rate,
            "avg_memory_usage": avg_memory,
            "hit_rate_trend": hit_rate_trend,
            "recommendations": self._generate_recommendations(avg_hit_rate, avg_memory)
        }

    def _generate_recommendations(self, hit_rate: float, memory_usage: float) -> List[str]:
        """Generate optimization recommendations."""
        recommendations = []

        if hit_rate < 0.5:
            recommendations.append("Consider increasing cache size or adjusting eviction policy")

        if memory_usage > 500:  # MB
            recommendations.append("High memory usage - consider more aggressive eviction")

        if hit_rate > 0.9 and memory_usage < 100:
            recommendations.append("Excellent performance - consider reducing cache size to save memory")

        return recommendations
# --- end

# --- document 004, "Testing and Validation"
def test_advanced_cache_integration():
    """Test the advanced cache integration."""
    config = CacheConfig(
        max_batch_size=4,
        max_sequence_length=128,
        embed_dim=256,
        num_heads=8,
        num_layers=6,
        eviction_policy=EvictionPolicy.SLIDING_WINDOW,
        memory_limit_mb=50
    )

    cache = AdvancedKVCache(config)
    monitor = CachePerformanceMonitor(cache)

    # Simulate realistic workload
    for iteration in range(100):
        # Simulate variable sequence lengths
        seq_len = random.randint(16, 128)
        sequence_id = f"seq_{iteration % 10}"  # 10 different sequences

        for layer_id in range(config.num_layers):
            key = torch.randn(seq_len, config.embed_dim)
            value = torch.randn(seq_len, config.embed_dim)

            # Test cache operations
            cache.set_cache(layer_id, sequence_id, key, value)
            cached_kv = cache.get_cache(layer_id, sequence_id, seq_len)

            assert cached_kv is not None, f"Cache miss unexpected for {sequence_id}"

        # Collect metrics
        if iteration % 10 == 0:
            metrics = monitor.collect_metrics()
            print(f"Iteration {iteration}: Hit Rate = {metrics['hit_rate']:.2%}")

    # Final analysis
    analysis = monitor.analyze_performance()
    print("\nFinal Performance Analysis:")
    print(f"Average Hit Rate: {analysis['avg_hit_rate']:.2%}")
    print(f"Average Memory Usage: {analysis['avg_memory_usage']:.1f} MB")
    print(f"Trend: {analysis['hit_rate_trend']}")
    print("Recommendations:", analysis['recommendations'])

if __name__ == "__main__":
    test_advanced_cache_integration()
# --- end


# ============================================================================ names the document does not define
# (defined elsewhere in the reader's code) The model configuration the examples read.
@dataclass
class DecodeConfig:
    use_kv_cache: bool = True
    max_batch_size: int = 4


@dataclass
class TransformerModelConfig:
    embed_dim: int = 32
    num_heads: int = 4
    num_layers: int = 2
    max_seq_len: int = 64
    decode_config: DecodeConfig = field(default_factory=DecodeConfig)


# (defined elsewhere) A pre-norm transformer block around the document's attention.
class TransformerLayerV2(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, layer_id: int, kv_cache: Optional[AdvancedKVCache] = None):
        super().__init__()
        self.attention = MultiHeadAttentionV2(embed_dim, num_heads, layer_id=layer_id)
        self.attention.set_cache(kv_cache)
        self.norm1, self.norm2 = nn.LayerNorm(embed_dim), nn.LayerNorm(embed_dim)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, 2 * embed_dim), nn.GELU(), nn.Linear(2 * embed_dim, embed_dim))

    def forward(self, x: torch.Tensor, expanding_context: bool = False) -> torch.Tensor:
        x = x + self.attention(self.norm1(x), expanding_context=expanding_context)
        return x + self.mlp(self.norm2(x))


# (defined elsewhere) The speculative-decoding configuration Step 3 reads.
@dataclass
class SpecDecodingConfig:
    draft_config: TransformerModelConfig
    target_config: TransformerModelConfig
    draft_steps: int = 3


#: The vocabulary: token ``t`` is the embedding ``VOCAB[t]``; output embeddings are tied to it.
VOCAB = torch.randn(5, 32, generator=torch.Generator().manual_seed(123))


# (defined elsewhere) Step 3 calls this method of the Step 2 model: the greedy next token's
# embedding ``(B, 1, E)`` and the logits ``(B, 1, V)`` of the last position.
def generate_next_token_embedding_and_logits(self, x, expanding_context=False, sequence_id="default"):
    h = self(x, expanding_context=expanding_context, sequence_id=sequence_id)[:, -1:]
    logits = h @ VOCAB.T
    return VOCAB[logits.argmax(-1)], logits


AutoregressiveTransformerModelV2.generate_next_token_embedding_and_logits = generate_next_token_embedding_and_logits


# (not shown by the document) The three methods SpecDecodingPairV2.forward calls, greedy version.
def verify_draft_with_target(self, full_sequence, sequence_id):
    """The target's next-token probabilities at the ``draft_steps + 1`` positions that predict
    each draft token and one more, ``(B, k + 1, V)``, from one causal pass (the parallel
    verification speculative decoding is for; the document's attention has no causal mask, so
    the pass is :func:`reference_forward`, with the target's weights)."""
    k = self.config.draft_steps
    h = reference_forward(self.target_model, full_sequence, prompt_len=1)[:, -(k + 1):]
    return torch.softmax(h @ VOCAB.T, dim=-1)


def process_acceptance_and_resampling(self, draft_probs, target_probs, draft_sequence):
    """Greedy acceptance: keep the leading drafts the target would have chosen itself (the same
    count for every row), then the target's own token.  Returns ``(count, (B, 1, E))``."""
    draft_tokens, target_tokens = draft_probs.argmax(-1), target_probs.argmax(-1)
    agree = (draft_tokens == target_tokens[:, :-1]).all(0).long().cumprod(0)
    count = int(agree.sum())
    self.__dict__.setdefault("accepted_counts", []).append(count)
    return count, VOCAB[target_tokens[:, count:count + 1]]


def assemble_final_sequence(self, current_output, draft_sequence, final_count, resampled_embeddings):
    """The accepted drafts and the target's token appended.  The draft cache is rolled back to
    the tokens now fixed: the document's attention reads the first ``seq_len`` cached tokens, so
    without this it would read the keys of a rejected draft at the first rejected position."""
    out = torch.cat([current_output, draft_sequence[:, :final_count], resampled_embeddings], dim=1)
    for sid in self.draft_model.kv_cache.sequence_ids:
        self.draft_model.kv_cache.crop_sequence(sid, out.size(1) - 1)
    return out


SpecDecodingPairV2.verify_draft_with_target = verify_draft_with_target
SpecDecodingPairV2.process_acceptance_and_resampling = process_acceptance_and_resampling
SpecDecodingPairV2.assemble_final_sequence = assemble_final_sequence


# ============================================================================ references
def reference_forward(model, x: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """The Step 2 model's forward with the same weights, no cache, and the mask a step-by-step
    cache of the document's (maskless) attention amounts to: query ``i`` sees keys ``j <
    max(i + 1, prompt_len)`` -- the prompt (computed in one call) sees itself whole, each later
    token (added one per call) the tokens before it.  ``prompt_len=1``: a causal model.
    ``x`` ``(B, T, E)`` -> ``(B, T, E)``."""
    T = x.shape[1]
    i = torch.arange(T)
    mask = i[None, :] < torch.clamp(i[:, None] + 1, min=prompt_len)
    for layer in model.layers:
        a, h = layer.attention, layer.norm1(x)
        q, k, v = (p(h).view(x.shape[0], T, a.num_heads, a.head_dim).transpose(1, 2)
                   for p in (a.q_proj, a.k_proj, a.v_proj))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + a.out_proj(o.transpose(1, 2).reshape(x.shape[0], T, a.embed_dim))
        x = x + layer.mlp(layer.norm2(x))
    return x


def greedy_reference(model, x: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` greedy tokens of a causal ``model`` (one uncached pass per token), as embeddings."""
    for _ in range(n):
        h = reference_forward(model, x, prompt_len=1)[:, -1:]
        x = torch.cat([x, VOCAB[(h @ VOCAB.T).argmax(-1)]], dim=1)
    return x


def small_manager(blocks: int, embed_dim=32, num_heads=4, num_layers=1, **kw) -> AdvancedKVCache:
    """A manager whose budget is exactly ``blocks`` blocks of 4 tokens (float32)."""
    bytes_per_block = 4 * 2 * num_layers * embed_dim * 4
    settings = dict(max_batch_size=8, max_sequence_length=64, embed_dim=embed_dim, num_heads=num_heads,
                    num_layers=num_layers, block_size=4, memory_limit_mb=blocks * bytes_per_block / MiB)
    settings.update(kw)
    return AdvancedKVCache(CacheConfig(**settings))


def doc004_model(num_layers=2, use_kv_cache=True, seed=0) -> "AutoregressiveTransformerModelV2":
    _seed(seed)
    config = TransformerModelConfig(num_layers=num_layers, decode_config=DecodeConfig(use_kv_cache=use_kv_cache))
    return AutoregressiveTransformerModelV2(config).eval()


# ============================================================================ Step 1: the attention
def test_004_step1_attention_growing_input_equals_no_cache_and_stores_each_token_once():
    _seed(0)
    attention = MultiHeadAttentionV2(embed_dim=32, num_heads=4, layer_id=0).eval()
    cache = small_manager(blocks=16)
    attention.set_cache(cache, "seq")
    x = torch.randn(1, 20, 32)
    with torch.no_grad():
        for t in [5] + list(range(6, 21)):  # a 5-token prompt, then one token per call
            got = attention(x[:, :t], expanding_context=True)
            torch.testing.assert_close(got, attention(x[:, :t], expanding_context=False), atol=1e-6, rtol=1e-5)
            k, v = cache.get_cache(0, "seq")  # exactly this sequence's tokens, each once
            assert k.shape == v.shape == (t, 32) and cache.sequence_length("seq") == t
            torch.testing.assert_close(k, attention.k_proj(x[0, :t]), atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(v, attention.v_proj(x[0, :t]), atol=1e-6, rtol=1e-5)
        for t in (20, 12):  # the same length again (the cached K/V as they are), then a rollback
            got = attention(x[:, :t], expanding_context=True)
            torch.testing.assert_close(got, attention(x[:, :t], expanding_context=False), atol=1e-6, rtol=1e-5)
    # the attention's 18 reads (only the first missed) and this test's 16
    assert cache.get_global_stats()["per_layer"][0] == dict(hits=17 + 16, misses=1, hit_rate=33 / 34)
    assert cache.pool.num_used == 5 and cache.sequence_length("seq") == 20  # 20 tokens in blocks of 4, no leak
    cache.check_invariants()


def test_004_step1_two_sequences_and_an_eviction_between_steps_stay_right():
    """Two sequences share the module (``set_cache(cache, sequence_id)`` switches between them) in
    a pool of 5 blocks.  "a" is evicted while "b" grows; its next step misses, recomputes the
    whole K/V from the input and stores it: a deliberate restart, so the output is still right."""
    _seed(1)
    attention = MultiHeadAttentionV2(embed_dim=32, num_heads=4, layer_id=0).eval()
    cache = small_manager(blocks=5, eviction_policy="lru")
    xs = {"a": torch.randn(1, 12, 32), "b": torch.randn(1, 16, 32)}
    schedule = [("a", 4), ("b", 4), ("a", 8), ("b", 8), ("b", 16), ("a", 9), ("a", 12)]
    with torch.no_grad():
        for sid, t in schedule:
            attention.set_cache(cache, sid)
            got = attention(xs[sid][:, :t], expanding_context=True)
            torch.testing.assert_close(got, attention(xs[sid][:, :t]), atol=1e-6, rtol=1e-5)
            assert cache.sequence_length(sid) == t
            if (sid, t) == ("b", 16):
                assert cache.was_evicted("a")  # "b" needed 4 blocks of 5: "a" (2 blocks) had to go
    assert not cache.was_evicted("a") and [e[1] for e in cache.eviction_log] == ["a", "b"]
    cache.check_invariants()


# ============================================================================ Step 2: the model
def test_004_step2_model_caches_each_sequence_and_reports_and_clears_it():
    model = doc004_model(num_layers=2)
    assert model.kv_cache.config.eviction_policy is EvictionPolicy.SLIDING_WINDOW
    assert model.kv_cache.config.sliding_window_size == 32 and model.kv_cache.memory_bytes() <= 200 * MiB
    _seed(2)
    xs = {"x": torch.randn(1, 16, 32), "y": torch.randn(1, 9, 32)}
    prompt = 4
    with torch.no_grad():
        for t in range(prompt, 17):  # the two requests interleaved, one token per step after the prompt
            for sid, x in xs.items():
                if t > x.shape[1]:
                    continue
                out = model(x[:, :t], expanding_context=True, sequence_id=sid)
                ref = reference_forward(model, x[:, :t], prompt_len=prompt)
                torch.testing.assert_close(out[:, -1], ref[:, -1], atol=1e-5, rtol=1e-5)
                if t == prompt:  # the prompt is one uncached pass
                    torch.testing.assert_close(out, model(x[:, :t]), atol=1e-5, rtol=1e-5)
                for layer in range(2):
                    assert model.kv_cache.sequence_length(sid, layer) == t  # each token once
        # The document's attention has no causal mask: after the prompt, the deeper layer's cached
        # keys differ from one uncached pass over the whole input (see the module docstring).
        full = model(xs["x"])[:, -1]
        assert (full - reference_forward(model, xs["x"], prompt_len=prompt)[:, -1]).abs().max() > 1e-3
    stats = model.get_cache_stats()
    assert stats["num_sequences"] == 2 and stats["tokens_stored"] == 16 + 9
    assert stats["per_layer"] == [dict(hits=12 + 5, misses=2, hit_rate=17 / 19)] * 2
    assert stats["total_evictions"] == 0 and stats["eviction_policy"] == "sliding_window"
    model.clear_cache("x")
    assert model.kv_cache.sequence_ids == ["y"]
    model.clear_cache()
    assert len(model.kv_cache) == 0 and model.get_cache_stats()["memory_pool"]["used_blocks"] == 0


def test_004_step2_model_without_a_cache():
    model = doc004_model(num_layers=2, use_kv_cache=False)
    x = torch.randn(1, 6, 32)
    with torch.no_grad():
        out = model(x, expanding_context=True, sequence_id="x")  # no cache: the plain computation
        torch.testing.assert_close(out, reference_forward(model, x, prompt_len=6), atol=1e-5, rtol=1e-5)
    assert model.kv_cache is None and model.get_cache_stats() == {}
    model.clear_cache("x")  # nothing to clear, no error


# ============================================================================ Step 3: speculative decoding
SPEC = SpecDecodingConfig(draft_config=TransformerModelConfig(num_layers=1),
                          target_config=TransformerModelConfig(num_layers=2), draft_steps=3)


def test_004_step3_cache_configuration_of_the_pair():
    draft_cfg, target_cfg = create_cache_config_for_speculative_decoding()  # the call the pair makes
    assert draft_cfg.eviction_policy is EvictionPolicy.SLIDING_WINDOW
    assert target_cfg.eviction_policy is EvictionPolicy.NONE
    assert draft_cfg.memory_limit_mb + target_cfg.memory_limit_mb == 512
    _seed(3)
    pair = SpecDecodingPairV2(SPEC)
    draft, target = pair.draft_model.kv_cache, pair.target_model.kv_cache
    assert draft.config.eviction_policy is EvictionPolicy.SLIDING_WINDOW and draft.config.sliding_window_size == 256
    assert target.config.eviction_policy is EvictionPolicy.NONE
    assert draft.get_global_stats()["eviction_policy"] == "sliding_window"  # the mutation takes effect
    assert target.get_global_stats()["eviction_policy"] == "none"
    x = torch.randn(1, 5, 32)
    with torch.no_grad():
        draft_sequence, draft_probs = pair.generate_draft_sequence(x, "s")
    assert draft_sequence.shape == (1, 3, 32) and draft_probs.shape == (1, 3, VOCAB.shape[0])
    torch.testing.assert_close(draft_probs.sum(-1), torch.ones(1, 3))
    # the drafts are the draft model's greedy tokens (its cache computes a prefix-LM over the prompt)
    seq = x
    for j in range(3):
        h = reference_forward(pair.draft_model, seq, prompt_len=5)[:, -1:]
        seq = torch.cat([seq, VOCAB[(h @ VOCAB.T).argmax(-1)]], 1)
        assert torch.equal(draft_sequence[:, j], seq[:, -1])
    assert draft.sequence_length("s") == 7  # the prompt and the two drafts fed back in
    keys = draft.get_cache(0, "s")[0]
    pair.optimize_cache_memory()  # as written; the data survives the compaction
    assert torch.equal(draft.get_cache(0, "s")[0], keys)
    draft.check_invariants()
    stats = pair.get_comprehensive_stats()
    # the draft's three reads (the first missed) and this test's two
    assert stats["draft_model_cache"]["per_layer"] == [dict(hits=2 + 2, misses=1, hit_rate=0.8)]
    assert stats["target_model_cache"]["hits"] == stats["target_model_cache"]["misses"] == 0


def test_004_step3_forward_equals_greedy_decoding_of_the_target(capsys):
    _seed(4)
    pair = SpecDecodingPairV2(SPEC).eval()
    x = torch.randn(2, 4, 32)
    with torch.no_grad():
        out = pair(x, n=16)
        want = greedy_reference(pair.target_model, x, out.shape[1] - x.shape[1])
    assert out.shape[1] >= x.shape[1] + 16 and torch.equal(out, want)
    iterations = capsys.readouterr().out.splitlines()
    assert iterations == [f"Speculative decoding iteration: {i}" for i in range(len(iterations))]
    assert len(iterations) >= 5  # so optimize_cache_memory ran (every 5th iteration) mid-decoding
    counts = pair.accepted_counts
    assert any(c > 0 for c in counts) and any(c < 3 for c in counts)  # drafts were accepted and rejected
    draft = pair.draft_model.kv_cache
    assert len(draft.sequence_ids) == 2 and all(s.startswith(f"batch_{i}_") for i, s in enumerate(draft.sequence_ids))
    layer = pair.draft_model.layers[0]
    for i, sid in enumerate(draft.sequence_ids):  # the cache holds the accepted tokens' keys, no rejected one
        n = draft.sequence_length(sid)  # the last token is never fed back; nor the one before if all were accepted
        assert out.shape[1] - 2 <= n <= out.shape[1] - 1
        torch.testing.assert_close(draft.get_cache(0, sid)[0], layer.attention.k_proj(layer.norm1(out[i, :n])),
                                   atol=1e-5, rtol=1e-5)
    stats = pair.get_comprehensive_stats()["draft_model_cache"]["per_layer"][0]
    reads = 2 * 3 * len(iterations)  # rows x draft steps x iterations; one cold start per row; + this test's 2
    assert stats["misses"] == 2 and stats["hits"] == reads - 2 + 2


# ============================================================================ performance metrics
def test_004_cache_performance_monitor_as_written_on_a_real_cache():
    cache = small_manager(blocks=4, eviction_policy="lru")
    monitor = CachePerformanceMonitor(cache)
    assert monitor.analyze_performance() == {"status": "insufficient_data"}
    k = torch.randn(4, 32)
    cache.set_cache(0, "a", k, k)  # one block
    reads = []
    for step in range(16):  # 4 reads per step: hits for 3 steps, then only misses
        for _ in range(4):
            reads.append(cache.get_cache(0, "a" if step < 3 else "gone") is not None)
        m = monitor.collect_metrics()
        assert m["hit_rate"] == sum(reads) / len(reads)  # cumulative, as get_global_stats reports it
        assert m["memory_usage_mb"] == cache.memory_bytes() / MiB and m["evictions"] == 0
        assert m["memory_pool_efficiency"] == 0.0  # the one block allocated was new memory
        if step == 5:  # rates 1, 1, 1, 12/16, 12/20, 12/24
            a = monitor.analyze_performance()
            assert a["avg_hit_rate"] == pytest.approx((3 + 0.75 + 0.6 + 0.5) / 6)
            assert a["avg_memory_usage"] == cache.memory_bytes() / MiB
            assert a["hit_rate_trend"] == "degrading" and a["recommendations"] == []  # 0.5 < 0.75 - 0.1
    a = monitor.analyze_performance()  # the last 10 snapshots: 12/28 ... 12/64
    assert a["avg_hit_rate"] == pytest.approx(sum(12 / (4 * n) for n in range(7, 17)) / 10)
    assert a["hit_rate_trend"] == "stable"  # 12/64 vs 12/56: within 0.1
    assert a["recommendations"] == ["Consider increasing cache size or adjusting eviction policy"]
    for i in range(8):  # a full pool: LRU evicts, and the monitor sees it
        cache.set_cache(0, f"s{i}", torch.randn(8, 32), torch.randn(8, 32))
    assert monitor.collect_metrics()["evictions"] == cache.get_global_stats()["total_evictions"] == 7  # a, s0..s5

    hot = small_manager(blocks=4)
    hot_monitor = CachePerformanceMonitor(hot)
    hot.set_cache(0, "a", k, k)
    for _ in range(3):
        hot.get_cache(0, "a")
        hot_monitor.collect_metrics()
    assert hot_monitor.analyze_performance()["recommendations"] == [
        "Excellent performance - consider reducing cache size to save memory"]


def test_004_the_projects_monitor_reports_the_keys_the_document_reads():
    """``kv_cache.CachePerformanceMonitor`` is the project's fuller version: same constructor, same
    metric and analysis keys (with interval rates on top)."""
    cache = small_manager(blocks=4)
    monitor = kv_cache.CachePerformanceMonitor(cache)
    cache.set_cache(0, "a", torch.randn(4, 32), torch.randn(4, 32))
    for _ in range(3):
        cache.get_cache(0, "a")
        m = monitor.collect_metrics()
    assert {"timestamp", "hit_rate", "memory_usage_mb", "evictions", "memory_pool_efficiency"} <= set(m)
    a = monitor.analyze_performance()
    assert {"avg_hit_rate", "avg_memory_usage", "hit_rate_trend", "recommendations"} <= set(a)
    assert a["avg_hit_rate"] == 1.0


# ============================================================================ production configurations
def test_004_production_configurations_are_valid_and_keep_their_budgets():
    # --- document 004, "Production Configurations"
    # For large language models (LLM inference)
    llm_config = CacheConfig(
        max_batch_size=64,
        max_sequence_length=4096,
        embed_dim=4096,
        num_heads=32,
        num_layers=48,
        eviction_policy=EvictionPolicy.ADAPTIVE,
        memory_limit_mb=2048,  # 2GB cache limit
        preallocate_memory=True,
        use_memory_pool=True,
    )

    # For mobile/edge deployment
    mobile_config = CacheConfig(
        max_batch_size=4,
        max_sequence_length=512,
        embed_dim=256,
        num_heads=8,
        num_layers=12,
        eviction_policy=EvictionPolicy.LRU,
        memory_limit_mb=64,  # 64MB limit
        preallocate_memory=False,
        use_memory_pool=True,
    )

    # For research/experimentation
    research_config = CacheConfig(
        max_batch_size=16,
        max_sequence_length=1024,
        embed_dim=512,
        num_heads=16,
        num_layers=24,
        eviction_policy=EvictionPolicy.NONE,  # No eviction for reproducibility
        memory_limit_mb=512,
        preallocate_memory=True,
        use_memory_pool=False,  # Disable pooling for debugging
    )
    # --- end
    for cfg in (llm_config, mobile_config, research_config):
        cfg.validate()
        pool_bytes = cfg.max_blocks * cfg.bytes_per_block
        assert cfg.memory_limit_mb * MiB - cfg.bytes_per_block < pool_bytes <= cfg.memory_limit_mb * MiB
    # LLM: one float32 token of 48 layers x 4096 wide is 1.5 MiB, so 2 GiB holds 1360 tokens --
    # less than one sequence of max_sequence_length=4096 (it would need 6 GiB, or float16 and 3 GiB).
    assert llm_config.bytes_per_token == 1.5 * MiB and llm_config.max_tokens == 1360
    assert llm_config.max_tokens < llm_config.max_sequence_length
    # Mobile (grows on demand): a workload larger than the budget stays within 64 MiB.
    mobile = AdvancedKVCache(mobile_config)
    assert mobile.memory_bytes() < 64 * MiB
    kv = torch.zeros(512, 256)
    for i in range(6):  # six full-length requests, all layers; max_batch_size=4: LRU evicts two
        for layer in range(mobile_config.num_layers):
            mobile.set_cache(layer, f"req{i}", kv, kv)
    assert mobile.memory_bytes() <= 64 * MiB and len(mobile) == 4
    assert mobile.get_global_stats()["sequences_evicted"] == 2
    mobile.check_invariants()
    del mobile
    # Research (reserve max_sequence_length per sequence, never evict): 1024 tokens x 96 KiB =
    # 96 MiB per sequence, so 5 of its 16 batch slots fit in 512 MiB; the 6th is refused.
    research = AdvancedKVCache(research_config)
    assert research.memory_bytes() == research_config.max_blocks * research_config.bytes_per_block <= 512 * MiB
    for i in range(5):
        research.add_sequence(i)
    with pytest.raises(PoolExhaustedError, match="memory_limit_mb=512.*eviction_policy=NONE never evicts"):
        research.add_sequence(5)
    assert len(research) == 5 and research.memory_bytes() <= 512 * MiB


# ============================================================================ testing and validation
def test_004_advanced_cache_integration_reads_exactly_what_was_stored(capsys, monkeypatch):
    """Replay the document's test with every read checked against the last ``set_cache``."""

    class CheckedCache(AdvancedKVCache):
        instances: list = []

        def __init__(self, config):
            super().__init__(config)
            self.stored, self.checked = {}, 0
            CheckedCache.instances.append(self)

        def set_cache(self, layer_id, sequence_id, key, value):
            self.stored[layer_id, sequence_id] = (key, value)
            return super().set_cache(layer_id, sequence_id, key, value)

        def get_cache(self, layer_id, sequence_id, seq_len=None):
            got = super().get_cache(layer_id, sequence_id, seq_len)
            key, value = self.stored[layer_id, sequence_id]
            assert torch.equal(got[0], key[:seq_len]) and torch.equal(got[1], value[:seq_len])
            self.checked += 1
            return got

    monkeypatch.setattr(sys.modules[__name__], "AdvancedKVCache", CheckedCache)
    random.seed(0)
    test_advanced_cache_integration()
    cache = CheckedCache.instances[-1]
    assert cache.checked == 600  # 100 iterations x 6 layers
    out = capsys.readouterr().out.splitlines()
    assert out[:10] == [f"Iteration {i}: Hit Rate = 100.00%" for i in range(0, 100, 10)]
    assert out[10:13] == ["", "Final Performance Analysis:", "Average Hit Rate: 100.00%"]
    assert out[13].startswith("Average Memory Usage: ") and float(out[13].split()[-2]) <= 50
    assert out[14:] == ["Trend: stable",
                        "Recommendations: ['Excellent performance - consider reducing cache size to save memory']"]
    stats = cache.get_global_stats()
    assert stats["hits"] == 600 and stats["misses"] == 0
    # max_batch_size=4 and 10 ids in turn: each new one evicts the least recently used (a set_cache
    # of an evicted id stores its whole K/V again: a deliberate restart, allowed)
    assert len(cache) == 4 and stats["sequences_evicted"] == 96
    assert cache.memory_bytes() <= 50 * MiB and cache.config.window_tokens == 128
    cache.check_invariants()


def test_004_advanced_cache_integration_with_the_projects_monitor(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "CachePerformanceMonitor", kv_cache.CachePerformanceMonitor)
    random.seed(1)
    test_advanced_cache_integration()


# ============================================================================ migration guide
def test_004_migration_guide_fragments():
    config = SimpleNamespace(use_kv_cache=True)  # (defined elsewhere: the model's configuration)

    class Old:
        def __init__(self):
            # --- document 004, "Migration Guide" 1, Old
            self.use_kv_cache = config.use_kv_cache
            self.cache_dict = {}
            # --- end

    class New:
        def __init__(self):
            # --- document 004, "Migration Guide" 1, New
            self.cache_config = CacheConfig(...)
            self.kv_cache = AdvancedKVCache(self.cache_config)
            # --- end

    class NewFilledIn:
        def __init__(self):
            # --- document 004, "Migration Guide" 1, New -- the "..." filled in (the only change)
            self.cache_config = CacheConfig(max_batch_size=8, max_sequence_length=64, embed_dim=32, num_heads=4,
                                            num_layers=2, memory_limit_mb=1)
            self.kv_cache = AdvancedKVCache(self.cache_config)
            # --- end

    old = Old()
    with pytest.raises(TypeError, match="missing 4 required positional arguments"):
        New()  # the literal ``...`` is the document's placeholder, refused by Python itself
    new = NewFilledIn()
    layer_id, sequence_id, seq_len = 1, "req", 3  # (defined elsewhere: where the caller is)
    key, value = torch.randn(5, 32), torch.randn(5, 32)
    old.cache_dict["key"] = key
    new.kv_cache.set_cache(layer_id, sequence_id, key, value)

    self = old
    # --- document 004, "Migration Guide" 2, Old
    if self.use_kv_cache and "key" in self.cache_dict:
        cached_key = self.cache_dict["key"]
    # --- end
    assert cached_key is key
    self = new
    # --- document 004, "Migration Guide" 2, New
    cached_kv = self.kv_cache.get_cache(layer_id, sequence_id, seq_len)
    if cached_kv:
        cached_key, cached_value = cached_kv
    # --- end
    assert torch.equal(cached_key, key[:3]) and torch.equal(cached_value, value[:3])

    for i in range(4):  # fragmentation (two freed holes) and more misses than hits
        new.kv_cache.set_cache(0, i, torch.randn(8, 32), torch.randn(8, 32))
    new.kv_cache.clear_sequence(0)
    new.kv_cache.clear_sequence(2)
    for _ in range(4):
        new.kv_cache.get_cache(0, "nobody")
    keys = {i: new.kv_cache.get_cache(0, i)[0] for i in (1, 3)}
    # --- document 004, "Migration Guide" 3
    # Monitor cache performance
    stats = self.kv_cache.get_global_stats()
    if stats["global_hit_rate"] < 0.5:
        self.kv_cache.optimize_memory()
    # --- end
    assert stats["global_hit_rate"] == 3 / 7  # below 0.5: the storage was compacted
    held = sorted(b for sid in self.kv_cache.sequence_ids for b in self.kv_cache.block_table(sid))
    assert held == list(range(3))  # "req", 1 and 3: one block of 16 tokens each, now at the front
    assert all(torch.equal(self.kv_cache.get_cache(0, i)[0], keys[i]) for i in (1, 3))
    self.kv_cache.check_invariants()
