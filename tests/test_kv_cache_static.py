"""Unit tests for StaticKVCache and SubStaticCache: shapes, errors, capacity, in-place storage."""

import pytest
import torch

from kv_cache import CacheCapacityError, StaticKVCache, SubStaticCache


def make(**kw):
    cfg = dict(max_cache_len=8, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=3, max_batch_size=2)
    cfg.update(kw)
    return StaticKVCache(**cfg)


def kv(b=2, h=2, s=1, d=3, layout="bhsd", k_dtype=torch.float32, v_dtype=torch.float32, fill=None):
    shape = (b, h, s, d) if layout == "bhsd" else (b, s, h, d)
    k, v = torch.randn(shape).to(k_dtype), torch.randn(shape).to(v_dtype)
    if fill is not None:
        k.fill_(fill), v.fill_(fill)
    return k, v


# ----------------------------------------------------------------------------- construction
@pytest.mark.parametrize("name, value, match", [
    ("max_cache_len", 0, r"max_cache_len must be a positive int, got 0"),
    ("num_layers", -1, r"num_layers must be a positive int, got -1"),
    ("num_heads", 2.0, r"num_heads must be a positive int, got 2.0"),
    ("num_kv_heads", 3, r"num_heads=4 must be a multiple of num_kv_heads=3"),
    ("head_dim", 0, r"head_dim must be a positive int, got 0"),
    ("max_batch_size", True, r"max_batch_size must be a positive int, got True"),
    ("layout", "bsdh", r"layout='bsdh' is not supported; expected one of \('bhsd', 'bshd'\)"),
])
def test_constructor_errors_name_parameter_value_and_expectation(name, value, match):
    with pytest.raises(ValueError, match=match):
        make(**{name: value})


def test_constructor_rejects_non_dtype():
    with pytest.raises(TypeError, match=r"k_dtype must be a torch.dtype.*'float16'"):
        make(k_dtype="float16")


@pytest.mark.parametrize("layout, shape", [("bhsd", (2, 2, 8, 3)), ("bshd", (2, 8, 2, 3))])
def test_preallocates_zeroed_buffers_in_layout_with_separate_dtypes(layout, shape):
    c = make(layout=layout, k_dtype=torch.float16, v_dtype=torch.bfloat16)
    assert len(c.keys) == len(c.values) == 2
    for k, v in zip(c.keys, c.values):
        assert k.shape == v.shape == shape and k.dtype == torch.float16 and v.dtype == torch.bfloat16
        assert not k.any() and not v.any()
    assert c.memory_bytes() == 2 * (2 * 2 * 8 * 3) * (2 + 2)  # layers * elements * (k + v bytes)


def test_properties_and_gqa_repeat_factor():
    c = make(dtype=torch.float64, v_dtype=torch.float32)
    assert (c.max_cache_len, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.max_batch_size) == (8, 2, 4, 2, 3, 2)
    assert (c.k_dtype, c.v_dtype) == (torch.float64, torch.float32)
    assert c.num_key_value_groups == 2 and c.get_max_cache_shape() == 8
    assert make(num_kv_heads=None).num_kv_heads == 4
    assert c.memory_bytes() == 2 * (2 * 2 * 8 * 3) * (8 + 4)


# ----------------------------------------------------------------------------- update errors
def test_update_error_messages_name_tensor_layer_and_expected_value():
    c = make()
    with pytest.raises(CacheCapacityError, match=r"key for layer 0 .* batch size 3, expected at most max_batch_size=2"):
        c.update(*kv(b=3), 0)
    with pytest.raises(ValueError, match=r"key for layer 1 .* has 4 heads, expected num_kv_heads=2.*query heads"):
        c.update(*kv(h=4), 1)
    with pytest.raises(ValueError, match=r"key for layer 0 .* has head dim 5, expected head_dim=3"):
        c.update(*kv(d=5), 0)
    with pytest.raises(ValueError, match=r"value for layer 1 .* dtype torch.float16, expected v_dtype=torch.float32"):
        c.update(*kv(v_dtype=torch.float16), 1)
    with pytest.raises(ValueError, match=r"key for layer 0 .* dtype torch.float64, expected k_dtype=torch.float32"):
        c.update(*kv(k_dtype=torch.float64), 0)
    k, v = torch.empty(2, 2, 1, 3, device="meta"), torch.empty(2, 2, 1, 3, device="meta")
    with pytest.raises(ValueError, match=r"key for layer 0 .* on device meta, expected the cache's device cpu"):
        c.update(k, v, 0)
    for bad in (2, -1):
        with pytest.raises(IndexError, match=rf"layer_idx={bad} is out of range: this cache has num_layers=2"):
            c.update(*kv(), bad)
    with pytest.raises(IndexError, match=r"layer_idx=2 is out of range"):
        c.get(2)
    with pytest.raises(IndexError, match=r"layer_idx=5 is out of range"):
        c.get_seq_length(5)
    assert c.get_seq_length(0) == c.get_seq_length(1) == 0  # nothing was stored by failed calls


def test_capacity_error_names_length_new_tokens_and_capacity_and_changes_nothing():
    c = make()
    k0, v0 = kv(s=6)
    c.update(k0, v0, 0)
    with pytest.raises(CacheCapacityError, match=r"layer 0: current length 6, 3 new token\(s\) .* need 9 slots.*max_cache_len=8"):
        c.update(*kv(s=3), 0)
    with pytest.raises(ValueError, match=r"position 8 need 9 slots"):  # CacheCapacityError is a ValueError
        c.update(*kv(s=1), 0, cache_position=torch.tensor(8))
    assert c.get_seq_length(0) == 6 and torch.equal(c.get(0)[0], k0)
    c.update(*kv(s=2), 0)  # exactly full is fine
    assert c.get_seq_length(0) == 8


def test_update_returns_views_of_the_preallocated_storage():
    c = make(layout="bshd")
    ptr = c.keys[0].data_ptr()
    k, v = c.update(*kv(s=3, layout="bshd"), 0)
    assert k.data_ptr() == ptr and k.shape == (2, 3, 2, 3)
    k, _ = c.update(*kv(s=1, layout="bshd"), 0)
    assert k.data_ptr() == ptr and k.shape == (2, 4, 2, 3) and c.keys[0].data_ptr() == ptr


def test_batch_must_stay_fixed_while_tokens_are_stored():
    c = make(max_batch_size=3)
    c.update(*kv(b=2), 0)
    with pytest.raises(ValueError, match=r"batch size 1, but the cache holds 2 rows"):
        c.update(*kv(b=1), 1)
    c.reset()
    assert c.update(*kv(b=3), 1)[0].shape[0] == 3


# ----------------------------------------------------------------------------- reset / rebatch
def test_reset_keeps_storage_and_never_written_slots_read_zero():
    c = make()
    ptrs = [t.data_ptr() for t in c.keys + c.values]
    c.update(*kv(s=8, fill=5.0), 0)
    c.reset()
    assert c.get_seq_length(0) == 0 and c.get(0) is None and c.batch_size is None
    assert [t.data_ptr() for t in c.keys + c.values] == ptrs
    k, v = c.update(*kv(s=1, fill=1.0), 0, cache_position=torch.tensor(3))
    assert k.shape[2] == 4 and not k[:, :, :3].any() and not v[:, :, :3].any() and (k[:, :, 3] == 1).all()
    k, _ = c.update(*kv(s=2, fill=2.0), 0, cache_position=torch.tensor([[6, 5], [7, 4]]))
    assert k.shape[2] == 8 and torch.equal(k[0, 0, :, 0], torch.tensor([0, 0, 0, 1, 0, 2, 2, 0.]))
    assert torch.equal(k[1, 0, :, 0], torch.tensor([0, 0, 0, 1, 2, 0, 0, 2.]))


def test_rebatch_is_in_place_and_bounded_by_max_batch_size():
    c = make(max_batch_size=4)
    k, v = kv(b=2, s=3)
    c.update(k, v, 0)
    ptrs = [t.data_ptr() for t in c.keys + c.values]
    c.batch_repeat_interleave(2)
    assert torch.equal(c.get(0)[0], k.repeat_interleave(2, dim=0))
    c.reorder_cache(torch.tensor([3, 2, 1, 0]))
    assert torch.equal(c.get(0)[1], v.repeat_interleave(2, dim=0).flip(0))
    c.batch_select_indices([1])
    assert torch.equal(c.get(0)[0], k[1:2])
    assert [t.data_ptr() for t in c.keys + c.values] == ptrs
    c.batch_repeat_interleave(4)
    with pytest.raises(CacheCapacityError, match=r"batch_repeat_interleave\(2\) would give 8 rows \(from 4\), but max_batch_size=4"):
        c.batch_repeat_interleave(2)
    with pytest.raises(CacheCapacityError, match=r"batch_select_indices with 5 indices would give 5 rows"):
        c.batch_select_indices([0, 0, 1, 1, 2])
    with pytest.raises(IndexError, match=r"indices must be in \[0, 4\)"):
        c.batch_select_indices([4])
    assert c.batch_size == 4 and torch.equal(c.get(0)[0], k[1:2].expand(4, -1, -1, -1))


# ----------------------------------------------------------------------------- SubStaticCache
def test_sub_cache_writes_into_parent_storage_with_its_own_lengths():
    parent = make(max_batch_size=5)
    a, b = SubStaticCache(parent, 0, 2), SubStaticCache(parent, start_idx=2, length=3)
    assert a.keys[0].data_ptr() == parent.keys[0].data_ptr()
    assert b.keys[1].data_ptr() == parent.keys[1][2].data_ptr()
    ka, va = kv(b=2, s=2)
    kb, vb = kv(b=3, s=5)
    a.update(ka, va, 0)
    b.update(kb, vb, 0)
    assert torch.equal(parent.keys[0][0:2, :, :2], ka) and torch.equal(parent.values[0][2:5, :, :5], vb)
    assert (a.get_seq_length(0), b.get_seq_length(0), parent.get_seq_length(0)) == (2, 5, 0)
    b.reorder_cache([2, 1, 0])
    assert torch.equal(parent.keys[0][2:5, :, :5], kb.flip(0)) and torch.equal(a.get(0)[0], ka)
    a.reset()
    assert a.get_seq_length(0) == 0 and b.get_seq_length(0) == 5


def test_sub_cache_limits_memory_and_repr():
    parent = make(max_batch_size=5)
    sub = SubStaticCache(parent, 1, 2)
    assert sub.max_batch_size == 2 and sub.max_cache_len == 8 and sub.num_key_value_groups == 2
    assert sub.memory_bytes() == parent.memory_bytes() * 2 // 5
    sub.update(*kv(b=2), 0)
    with pytest.raises(CacheCapacityError, match=r"would give 4 rows \(from 2\), but max_batch_size=2"):
        sub.batch_repeat_interleave(2)
    with pytest.raises(CacheCapacityError, match=r"batch size 3, expected at most max_batch_size=2"):
        SubStaticCache(parent, 3, 2).update(*kv(b=3), 0)
    nested = SubStaticCache(SubStaticCache(parent, 1, 4), 2, 2)  # rows 3-4 of the parent
    nested.update(*kv(b=2, fill=9.0), 1)
    assert (parent.keys[1][3:5, :, 0] == 9).all() and not parent.keys[1][:3].any()
    assert "rows=1..2 of 5" in repr(sub)


@pytest.mark.parametrize("args, exc, match", [
    ((0, 0), ValueError, r"length must be a positive int, got 0"),
    ((-1, 2), ValueError, r"start_idx must be a non-negative int, got -1"),
    ((4, 2), ValueError, r"start_idx=4 \+ length=2 = 6 rows exceeds the parent's max_batch_size=5"),
])
def test_sub_cache_validates_its_slice(args, exc, match):
    with pytest.raises(exc, match=match):
        SubStaticCache(make(max_batch_size=5), *args)


def test_sub_cache_needs_a_static_parent():
    with pytest.raises(TypeError, match=r"parent must be a StaticKVCache, got list"):
        SubStaticCache([], 0, 1)
