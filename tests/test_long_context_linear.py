"""``LinearKVCache`` / ``linear_kv_cache_attention``: at every step the output equals brute-force
attention over the ``keep_window_size`` most important of all tokens so far (new one included),
with the importance added to the scaled scores; the cache holds exactly that set per batch row
and key/value head, in constant memory."""

from __future__ import annotations

import math

import pytest
import torch

from kv_cache import LinearKVCache, linear_kv_cache_attention


def brute_force(q, keys, values, importance, keep):
    """Full history ``(B, H_kv, t+1, D)``; keep the top ``keep`` by (importance, newer first) per
    row/head, attend with ``softmax(q.k/sqrt(D) + importance)`` over them.  Returns (out, kept sets)."""
    B, Hkv, T, D = keys.shape
    G = q.shape[1] // Hkv
    out = torch.empty(B, q.shape[1], 1, values.shape[-1])
    kept = {}
    for b in range(B):
        for h in range(Hkv):
            order = sorted(range(T), key=lambda i: (importance[b, h, i].item(), i), reverse=True)
            sel = sorted(order[:keep])
            kept[b, h] = sel
            for g in range(G):
                s = keys[b, h, sel] @ q[b, h * G + g, 0] / math.sqrt(D) + importance[b, h, sel]
                out[b, h * G + g, 0] = s.softmax(-1) @ values[b, h, sel]
    return out, kept


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])
@pytest.mark.parametrize("keep", [1, 5])
def test_equals_brute_force_top_k_attention(keep, heads, ties):
    Hq, Hkv = heads
    g = torch.Generator().manual_seed(keep + Hkv)
    B, D, T = 2, 8, 24
    keys, values = torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    imp = torch.randint(0, 3, (B, Hkv, T), generator=g).float() if ties else torch.randn(B, Hkv, T, generator=g)
    cache = None
    for t in range(T):
        q = torch.randn(B, Hq, 1, D, generator=g)
        out, cache = linear_kv_cache_attention(q, keys[:, :, t:t + 1], values[:, :, t:t + 1], imp[:, :, t, None, None],
                                               cache=cache, keep_window_size=keep, sequence_position=t)
        ref, kept = brute_force(q, keys[:, :, :t + 1], values[:, :, :t + 1], imp[:, :, :t + 1], keep)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        pos = cache.key_positions(0)
        assert all(sorted(pos[b, h].tolist()) == kept[b, h] for b in range(B) for h in range(Hkv))
    info = cache.get_cache_info()
    assert info == {"capacity_utilization": 1.0, "evictions": T - keep, "tokens_seen": T, "cached_tokens": keep,
                    "keep_window_size": keep, "memory_bytes": cache.memory_bytes()}
    assert cache.memory_bytes() == keep * B * Hkv * (2 * D * 4 + 4 + 8)  # k, v fp32 + importance + position


def test_a_prompt_falls_back_to_causal_attention_then_decoding_is_exact():
    g = torch.Generator().manual_seed(0)
    B, H, D, P, keep = 1, 2, 8, 6, 4
    keys, values = torch.randn(B, H, P + 5, D, generator=g), torch.randn(B, H, P + 5, D, generator=g)
    imp = torch.randn(B, H, P + 5, generator=g)
    q = torch.randn(B, H, P, D, generator=g)
    bias = imp[:, :, None, :P]  # (B, H, 1, P): each key's importance, the same for every query
    out, cache = linear_kv_cache_attention(q, keys[:, :, :P], values[:, :, :P], bias, keep_window_size=keep)
    scores = q @ keys[:, :, :P].transpose(-1, -2) / math.sqrt(D) + bias
    scores = scores.masked_fill(torch.ones(P, P, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(out, scores.softmax(-1) @ values[:, :, :P], atol=1e-5, rtol=0)
    assert cache.get_cache_info()["cached_tokens"] == keep  # the top 4 of the prompt
    for t in range(P, P + 5):
        qt = torch.randn(B, H, 1, D, generator=g)
        out, cache = linear_kv_cache_attention(qt, keys[:, :, t:t + 1], values[:, :, t:t + 1], imp[:, :, t, None, None],
                                               cache, keep, sequence_position=t)
        ref, _ = brute_force(qt, keys[:, :, :t + 1], values[:, :, :t + 1], imp[:, :, :t + 1], keep)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_training_mode_is_plain_attention_and_leaves_the_cache():
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    out, cache = linear_kv_cache_attention(q, k, v, torch.zeros(1, 2, 3, 3), inference_mode=False)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref) and cache is None


def test_cache_interface_reset_and_batch_ops():
    cache = LinearKVCache(keep_window_size=3, num_heads=1, head_dim=2)
    k = torch.arange(10.0).reshape(2, 1, 5, 1).expand(2, 1, 5, 2).contiguous()
    imp = torch.tensor([[[5.0, 1, 4, 2, 3]], [[0.0, 9, 8, 7, 6]]])
    cache.update(k, k, 0, importance=imp)
    assert cache.key_positions(0).tolist() == [[[0, 2, 4]], [[1, 2, 3]]] and cache.get_seq_length() == 5
    cache.batch_select_indices([1])
    assert cache.get(0)[0][0, 0, :, 0].tolist() == [6.0, 7.0, 8.0]
    cache.batch_repeat_interleave(2)
    assert cache.get(0)[0].shape == (2, 1, 3, 2)
    with pytest.raises(ValueError, match="already evicted"):
        cache.rollback(2)
    cache.reset()
    assert cache.get(0) is None and cache.memory_bytes() == 0 and cache.get_cache_info()["tokens_seen"] == 0


@pytest.mark.parametrize("call, match", [
    (lambda: LinearKVCache(0), "keep_window_size must be a positive int, got 0"),
    (lambda: LinearKVCache(4).update(torch.randn(1, 1, 1, 2), torch.randn(1, 1, 1, 2), 0), "needs importance"),
    (lambda: LinearKVCache(4).update(torch.randn(1, 1, 2, 2), torch.randn(1, 1, 2, 2), 0, importance=torch.randn(1, 1)),
     r"importance for layer 0 must have shape \(batch, heads, new_tokens\)=\(1, 1, 2\)"),
    (lambda: LinearKVCache(4, num_heads=2).update(torch.randn(1, 1, 1, 2), torch.randn(1, 1, 1, 2), 0,
                                                  importance=torch.randn(1, 1, 1)), "expected num_heads=2"),
    (lambda: linear_kv_cache_attention(torch.randn(1, 3, 1, 2), torch.randn(1, 2, 1, 2), torch.randn(1, 2, 1, 2),
                                       torch.randn(1, 2, 1, 1)), r"query heads \(3\) must be a multiple"),
    (lambda: linear_kv_cache_attention(torch.randn(1, 2, 1, 2), torch.randn(1, 2, 1, 2), torch.randn(1, 2, 1, 2),
                                       torch.randn(1, 3, 1, 1)), "does not broadcast"),
    (lambda: linear_kv_cache_attention(torch.randn(1, 2, 1, 2), torch.randn(1, 2, 1, 2), torch.randn(1, 2, 1, 2),
                                       torch.randn(1, 2, 1, 1), cache=LinearKVCache(8), keep_window_size=4),
     "differs from the cache's 8"),
    (lambda: linear_kv_cache_attention(torch.randn(2, 2, 4), torch.randn(1, 2, 1, 2), torch.randn(1, 2, 1, 2),
                                       torch.randn(1, 2, 1, 1)), "query must be a 4-D"),
])
def test_invalid_arguments_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_positions_must_be_consecutive_and_prompts_need_an_empty_cache():
    step = lambda cache, pos, s=1: linear_kv_cache_attention(  # noqa: E731
        torch.randn(1, 1, s, 2), torch.randn(1, 1, s, 2), torch.randn(1, 1, s, 2), torch.randn(1, 1, 1, s),
        cache=cache, keep_window_size=4, sequence_position=pos)
    _, cache = step(None, 10)  # an empty cache may start anywhere
    _, cache = step(cache, 11)
    with pytest.raises(ValueError, match="next position of layer 0 is 12"):
        step(cache, 14)
    with pytest.raises(ValueError, match="non-empty LinearKVCache"):
        step(cache, 12, s=3)


def test_a_model_without_importance_cannot_use_it():
    from helpers import tiny_decoder
    with pytest.raises(ValueError, match="needs importance"):
        tiny_decoder().generate(torch.zeros(1, 3, dtype=torch.long), 2, cache_implementation=LinearKVCache(4))
