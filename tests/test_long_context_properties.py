"""Property tests (hypothesis): across random workloads -- prompts and decoding steps of random
sizes, batch rows dropped and repeated -- no long-context cache ever holds more memory than its
documented budget, and each still returns what its policy promises."""

from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from kv_cache import LinearKVCache, QuantizedKVCache, SinkKVCache, SlidingWindowKVCache

H, D, F32 = 2, 4, 4
OPS = st.lists(st.one_of(st.integers(1, 9).map(lambda s: ("update", s)), st.just(("select", 0)),
                         st.just(("repeat", 0))), min_size=1, max_size=14)


def run(cache, ops, layers, seed, importance=False):
    """Apply ``ops`` to ``cache`` (batch starts at 2, stays <= 4); yield ``(batch, returned, S)``."""
    g = torch.Generator().manual_seed(seed)
    batch = 2
    for op, size in ops:
        if op == "select" and batch > 1:
            keep = torch.randperm(batch, generator=g)[: max(1, batch // 2)]
            cache.batch_select_indices(keep)
            batch = keep.numel()
        elif op == "repeat" and batch <= 2:
            cache.batch_repeat_interleave(2)
            batch *= 2
        elif op == "update":
            for l in range(layers):
                k, v = torch.randn(batch, H, size, D, generator=g), torch.randn(batch, H, size, D, generator=g)
                kw = {"importance": torch.randn(batch, H, size, generator=g)} if importance else {}
                keys, _ = cache.update(k, v, l, **kw)
                yield batch, keys.shape[2], size
        yield batch, None, 0


@settings(max_examples=30, deadline=None)
@given(window=st.integers(1, 6), sinks=st.integers(0, 3), layers=st.integers(1, 2), ops=OPS, seed=st.integers(0, 999))
def test_window_and_sink_caches_stay_within_budget(window, sinks, layers, ops, seed):
    cache = SinkKVCache(sinks, window) if sinks else SlidingWindowKVCache(window)
    cap = sinks + window
    seen = 0
    for batch, returned, S in run(cache, ops, layers, seed):
        # k, v, int64 positions and the sink keys as handed over (the returned sink slots are scratch)
        budget = layers * (2 * batch * H * cap * D * F32 + cap * 8 + batch * H * sinks * D * F32)
        assert cache.memory_bytes() <= budget
        assert all(cache.stored_length(l) <= cap for l in range(layers))
        if returned is not None:
            assert returned <= cap - 1 + S  # sinks + (window - 1) old + the new tokens, at most
            seen += S
    assert cache.get_seq_length(0) == seen // layers


@settings(max_examples=30, deadline=None)
@given(keep=st.integers(1, 6), layers=st.integers(1, 2), ops=OPS, seed=st.integers(0, 999))
def test_linear_cache_stays_within_budget(keep, layers, ops, seed):
    cache = LinearKVCache(keep_window_size=keep)
    for batch, returned, _ in run(cache, ops, layers, seed, importance=True):
        assert cache.memory_bytes() <= layers * batch * H * keep * (2 * D * F32 + 4 + 8)
        if returned is not None:
            assert returned <= keep
            info = cache.get_cache_info()
            assert info["cached_tokens"] == min(keep, info["tokens_seen"]) and info["capacity_utilization"] <= 1


@settings(max_examples=30, deadline=None)
@given(nbits=st.sampled_from([2, 4, 8]), residual=st.integers(0, 5), layers=st.integers(1, 2), ops=OPS,
       seed=st.integers(0, 999))
def test_quantized_cache_stays_within_budget(nbits, residual, layers, ops, seed):
    cache = QuantizedKVCache(nbits=nbits, group_size=2, residual_length=residual)
    most_quantized = 0
    for batch, returned, _ in run(cache, ops, layers, seed):
        most_quantized = max(most_quantized, cache.quantized_length(0))
        per_token = batch * H * (D * nbits / 8 + 2 * 2 * D / 2)  # packed codes + fp16 scale, minimum
        blocks = -(-most_quantized // 256) * 256  # quantized storage grows in blocks of 256 tokens
        budget = layers * 2 * (blocks * per_token + batch * H * (residual + 1) * D * F32)  # window buffer: R + 1
        assert cache.memory_bytes() <= budget
        assert all(cache.get_seq_length(l) - cache.quantized_length(l) <= residual for l in range(layers))
