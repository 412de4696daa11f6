"""Unit tests for the manual KVCache: the meaning of seq_len, self/cross independence, lifecycle."""

import pytest
import torch

from kv_cache import CacheCapacityError, EncoderDecoderCache, KVCache, StaticKVCache


def make(batch=2):
    c = KVCache(num_layers=2, num_heads=2, d_k=4, max_seq_len=6)
    if batch:
        c.initialize_cache(batch)
    return c


def kv(b=2, s=1, h=2, d=4):
    return torch.randn(b, h, s, d), torch.randn(b, h, s, d)


def test_lifecycle_and_is_initialized():
    c = make(batch=0)
    assert not c.is_initialized and c.get_seq_len() == 0 and c.memory_bytes() == 0 and "uninitialized" in repr(c)
    for call, args in [("update_cache", (0, "self", *kv(), 1)), ("get_cached_kv", (0, "self", 0)),
                       ("as_encoder_decoder_cache", ())]:
        with pytest.raises(RuntimeError, match=rf"{call}\(\) called before initialize_cache\(batch_size\)"):
            getattr(c, call)(*args)
    c.initialize_cache(batch_size=2)
    assert c.is_initialized and isinstance(c.self_cache, StaticKVCache) and isinstance(c.cross_cache, StaticKVCache)
    assert c.self_cache.max_batch_size == 2 and c.self_cache.max_cache_len == 6
    assert c.memory_bytes() == 2 * 2 * 2 * (2 * 2 * 6 * 4) * 4  # caches * (K, V) * layers * elements * fp32
    c.update_cache(0, "self", *kv(), 1)
    c.clear_cache()
    assert not c.is_initialized and c.get_seq_len() == 0 and c.memory_bytes() == 0


def test_seq_len_is_the_length_after_the_write():
    c = make()
    ks, vs = [], []
    for t in range(4):  # decode one token per step: seq_len = tokens stored once this one is in
        k, v = kv()
        ks.append(k), vs.append(v)
        k_all, v_all = c.update_cache(1, "self", k, v, seq_len=t + 1)
        assert k_all.shape == (2, 2, t + 1, 4)
        assert torch.equal(k_all, torch.cat(ks, 2)) and torch.equal(v_all, torch.cat(vs, 2))
    assert c.get_seq_len(1) == 4 and c.get_seq_len() == 0  # get_seq_len(): layer 0, self-attention
    k3, v3 = c.get_cached_kv(1, "self", seq_len=3)  # how many tokens to return, from position 0
    assert k3.shape == (2, 2, 3, 4) and torch.equal(k3, torch.cat(ks[:3], 2)) and torch.equal(v3, torch.cat(vs[:3], 2))
    assert c.get_cached_kv(1, "self", 0)[0].shape == (2, 2, 0, 4)
    assert torch.equal(c.get_cached_kv(1, "self")[1], torch.cat(vs, 2))  # None: everything stored


def test_prompt_then_read_back_with_the_same_seq_len():
    """Document 002's "Advanced Usage": a 10-token write with ``seq_len=10`` into an empty cache,
    then ``get_cached_kv(..., seq_len=10)`` returns exactly those 10 tokens."""
    c = KVCache(num_layers=2, num_heads=2, d_k=4, max_seq_len=16)
    c.initialize_cache(batch_size=3)
    k, v = kv(b=3, s=10)
    k_all, v_all = c.update_cache(layer_idx=0, attention_type="self", k=k, v=v, seq_len=10)
    assert torch.equal(k_all, k) and torch.equal(v_all, v) and c.get_seq_len() == 10
    k10, v10 = c.get_cached_kv(layer_idx=0, attention_type="self", seq_len=10)
    assert torch.equal(k10, k) and torch.equal(v10, v)
    k11, v11 = kv(b=3, s=1)
    k_all, _ = c.update_cache(0, "self", k11, v11, seq_len=11)  # one more token: length 11
    assert torch.equal(k_all, torch.cat([k, k11], 2)) and torch.equal(c.get_cached_kv(0, "self", 4)[1], v[:, :, :4])


def test_smaller_seq_len_rolls_back_and_inconsistent_values_are_errors():
    c = make()
    k, v = kv(s=4)
    c.update_cache(0, "self", k, v, seq_len=4)
    k2, v2 = kv(s=1)
    k_all, _ = c.update_cache(0, "self", k2, v2, seq_len=3)  # drop tokens 2, 3, write at 2
    assert torch.equal(k_all, torch.cat([k[:, :, :2], k2], 2)) and c.get_seq_len() == 3
    with pytest.raises(ValueError, match=r"seq_len=5 for layer 0 \('self'\): expected an int in \[1, 4\] \(seq_len is "
                                         r"the length after the write.*leaving no hole"):
        c.update_cache(0, "self", *kv(), seq_len=5)  # a hole at position 3
    with pytest.raises(ValueError, match=r"seq_len=1 for layer 0 \('self'\): expected an int in \[2, 5\] .* the 2 new "
                                         r"token\(s\) take positions seq_len-2..seq_len-1"):
        c.update_cache(0, "self", *kv(s=2), seq_len=1)  # 2 new tokens cannot end before position 2
    with pytest.raises(ValueError, match=r"seq_len=4 for layer 0 \('self'\): expected an int in \[0, 3\] .* how many "
                                         r"tokens to return from position 0, and 3 are stored"):
        c.get_cached_kv(0, "self", seq_len=4)
    with pytest.raises(CacheCapacityError, match=r"seq_len=7 for layer 0 \('self'\) exceeds max_seq_len=6; expected "
                                                 r"seq_len <= 6"):
        c.update_cache(0, "self", *kv(s=4), seq_len=7)
    assert c.get_seq_len() == 3 and torch.equal(c.get_cached_kv(0, "self")[0], k_all)  # failed calls change nothing


def test_self_and_cross_are_independent():
    c = make()
    kc, vc = kv(s=5)
    c.update_cache(0, "cross", kc, vc, seq_len=5)
    ks, vs = kv(s=2)
    c.update_cache(0, "self", ks, vs, seq_len=2)
    assert c.get_seq_len(0, "cross") == 5 and c.get_seq_len(0, "self") == 2
    assert torch.equal(c.get_cached_kv(0, "cross", 5)[0], kc) and torch.equal(c.get_cached_kv(0, "self", 2)[1], vs)
    kc2, vc2 = kv(s=3)
    c.update_cache(0, "cross", kc2, vc2, seq_len=3)  # a new source replaces the old one
    assert c.get_seq_len(0, "cross") == 3 and torch.equal(c.get_cached_kv(0, "cross")[1], vc2)
    assert torch.equal(c.get_cached_kv(0, "self")[0], ks)


def test_argument_errors_name_parameter_value_and_expectation():
    c = make()
    with pytest.raises(ValueError, match=r"attention_type='encoder' is not supported; expected one of \('self', 'cross'\)"):
        c.update_cache(0, "encoder", *kv(), 1)
    with pytest.raises(IndexError, match=r"layer_idx=2 is out of range: this cache has num_layers=2 \(valid layer_idx 0\.\.1\)"):
        c.get_cached_kv(2, "self", 0)
    with pytest.raises(ValueError, match=r"k has shape \(2, 3, 1, 4\), expected \(batch <= 2, num_heads=2, s >= 1, d_k=4\)"):
        c.update_cache(0, "self", *kv(h=3), 1)
    with pytest.raises(ValueError, match=r"v has shape \(3, 2, 1, 4\), expected \(batch <= 2"):
        c.update_cache(0, "self", kv()[0], kv(b=3)[1], 1)
    with pytest.raises(ValueError, match=r"k has shape \(2, 2, 4\)"):
        c.update_cache(0, "self", torch.zeros(2, 2, 4), torch.zeros(2, 2, 4), 1)
    with pytest.raises(ValueError, match=r"k and v must have the same shape"):
        c.update_cache(0, "self", kv(s=2)[0], kv(s=1)[1], 2)
    with pytest.raises(ValueError, match=r"seq_len=1.5 for layer 0 \('self'\): expected an int in \[1, 1\]"):
        c.update_cache(0, "self", *kv(), 1.5)
    with pytest.raises(ValueError, match=r"seq_len=-1 for layer 0 \('cross'\)"):
        c.update_cache(0, "cross", *kv(), -1)
    with pytest.raises(ValueError, match=r"d_k must be a positive int, got 0"):
        KVCache(num_layers=1, num_heads=1, d_k=0, max_seq_len=4)
    with pytest.raises(ValueError, match=r"batch_size must be a positive int, got 0"):
        c.initialize_cache(0)


def test_encoder_decoder_view_shares_storage_and_lengths():
    c = make()
    view = c.as_encoder_decoder_cache()
    assert isinstance(view, EncoderDecoderCache) and c.as_encoder_decoder_cache() is view
    kc, vc = kv(s=4)
    c.update_cache(1, "cross", kc, vc, seq_len=4)
    assert view.has_cross(1) and torch.equal(view.get_cross(1)[0], kc)
    k, v = kv(s=2)
    view.update(k, v, 0)  # a model speaking the Cache interface
    assert c.get_seq_len() == 2 and torch.equal(c.get_cached_kv(0, "self", 2)[0], k)
    view.set_cross(0, *kv(s=3))
    assert c.get_seq_len(0, "cross") == 3
    assert view.get(0)[0].data_ptr() == c.self_cache.keys[0].data_ptr()
    c.update_cache(0, "self", *kv(), seq_len=3)
    assert view.get_seq_length(0) == 3
    view.crop(1)  # through the Cache face: the self cache no longer starts at position 0
    with pytest.raises(ValueError, match=r"update_cache: layer 0 \('self'\) was crop\(\)ped .* no longer holds "
                                         r"positions 0..1"):
        c.update_cache(0, "self", *kv(), seq_len=4)
    with pytest.raises(ValueError, match=r"get_cached_kv: layer 0 \('self'\) was crop\(\)ped"):
        c.get_cached_kv(0, "self", 1)
    c.initialize_cache(2)  # fresh storage: a new view
    assert c.as_encoder_decoder_cache() is not view and c.as_encoder_decoder_cache().is_updated == {}
