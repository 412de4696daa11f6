"""Unit tests for EncoderDecoderCache: delegation and cross-attention bookkeeping."""

import pytest
import torch

from kv_cache import DynamicKVCache, EncoderDecoderCache, StaticKVCache


def kv(b=2, s=1, h=2, d=4):
    return torch.randn(b, h, s, d), torch.randn(b, h, s, d)


def static(max_cache_len=8, layout="bhsd"):
    return StaticKVCache(max_cache_len=max_cache_len, num_layers=2, num_heads=2, head_dim=4,
                         max_batch_size=4, layout=layout)


def test_defaults_are_two_distinct_dynamic_caches():
    c = EncoderDecoderCache()
    assert isinstance(c.self_attention_cache, DynamicKVCache)
    assert isinstance(c.cross_attention_cache, DynamicKVCache)
    assert c.self_attention_cache is not c.cross_attention_cache
    assert c.is_updated == {} and c.get_seq_length() == 0 and c.get_max_cache_shape() is None
    assert c.layout == "bhsd" and c.is_lossless


def test_constructor_errors():
    with pytest.raises(TypeError, match=r"cross_attention_cache must be a kv_cache.Cache, got dict"):
        EncoderDecoderCache(DynamicKVCache(), {})
    d = DynamicKVCache()
    with pytest.raises(ValueError, match=r"must be two different cache objects"):
        EncoderDecoderCache(d, d)


def test_cross_keys_are_set_once_and_reused():
    c = EncoderDecoderCache(static(), static(max_cache_len=5))
    assert not c.has_cross(0) and c.get_cross_seq_length(0) == 0
    with pytest.raises(ValueError, match=r"no cross-attention keys/values for layer_idx=1 .* expected set_cross\(1, key, value\)"):
        c.get_cross(1)
    k, v = kv(s=5)
    sk, sv = c.set_cross(1, k, v)
    assert torch.equal(sk, k) and torch.equal(sv, v)
    assert c.has_cross(1) and not c.has_cross(0) and c.is_updated == {1: True}
    gk, gv = c.get_cross(1)
    assert gk.data_ptr() == c.cross_attention_cache.keys[1].data_ptr() and torch.equal(gv, v)
    with pytest.raises(ValueError, match=r"layer_idx=1 are already stored .* call reset\(\) before a new source"):
        c.set_cross(1, *kv(s=5))
    calls = []
    def compute():
        calls.append(1)
        return kv(s=5)
    first = c.get_or_set_cross(0, compute)
    second = c.get_or_set_cross(0, compute)
    assert len(calls) == 1 and torch.equal(first[0], second[0]) and c.get_cross_seq_length(0) == 5
    assert c.get_seq_length(0) == 0  # the decoder history is a different cache


def test_self_side_delegation_rollback_crop_and_reset():
    c = EncoderDecoderCache(static(), static())
    k, v = kv(s=3)
    out = c.update(k, v, 0)
    assert torch.equal(out[0], k) and torch.equal(c.get(0)[1], v) and c.get_seq_length(0) == 3
    assert c.get(1) is None and c.get_max_cache_shape() == 8 and len(c) == 3
    c.set_cross(0, *kv(s=4))
    c.rollback(-1)  # rolls back the decoder only
    assert c.get_seq_length(0) == 2 and c.get_cross_seq_length(0) == 4 and c.has_cross(0)
    c.crop(1)  # keeps the most recent decoder token only; the source stays
    assert c.get_seq_length(0) == 2 and torch.equal(c.get(0)[0], k[:, :, 1:2]) and c.get_cross_seq_length(0) == 4
    assert c.key_positions(0).tolist() == [1] and not c.is_lossless
    c.rollback(2)  # a no-op at the current length is fine; below the first kept position is refused
    with pytest.raises(ValueError, match=r"crop\(\) already dropped positions 0..0"):
        c.rollback(0)
    assert c.memory_bytes() == 2 * static().memory_bytes()
    c.reset()
    assert c.get_seq_length(0) == 0 and c.get_cross_seq_length(0) == 0 and c.is_lossless
    assert not c.has_cross(0) and c.is_updated == {}
    c.set_cross(0, *kv(s=2))  # a new source after reset
    assert c.get_cross_seq_length(0) == 2


def test_batch_ops_apply_to_both_caches():
    c = EncoderDecoderCache()
    ks, vs = kv(b=2, s=3)
    kc, vc = kv(b=2, s=5)
    c.update(ks, vs, 0)
    c.set_cross(0, kc, vc)
    c.batch_repeat_interleave(2)
    assert c.get(0)[0].shape[0] == 4 and c.get_cross(0)[0].shape[0] == 4
    c.reorder_cache(torch.tensor([3, 0, 1, 2]))
    idx = torch.tensor([1, 0, 0, 1])
    assert torch.equal(c.get(0)[0], ks[idx]) and torch.equal(c.get_cross(0)[1], vc[idx])
    c.batch_select_indices([2])
    assert torch.equal(c.get(0)[1], vs[[0]]) and torch.equal(c.get_cross(0)[0], kc[[0]])


def test_wrapping_a_filled_cross_cache_marks_its_layers_updated():
    cross = static(layout="bshd")
    cross.update(torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4), 1)
    c = EncoderDecoderCache(static(), cross)
    assert c.is_updated == {1: True} and c.has_cross(1) and not c.has_cross(0)
    assert c.cross_attention_cache.layout == "bshd" and "is_updated=[1]" in repr(c)
