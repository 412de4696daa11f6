"""``crop(n)`` keeps the ``n`` most recent tokens; ``rollback(n)`` keeps the first ``n`` positions.

For every cache that can do it (dynamic, static, sub-static, fixed-shape, encoder-decoder,
sliding window, zero-sink StreamingLLM, quantized) ``crop`` keeps exactly the last ``n`` tokens
of each layer -- the same key/value tensors, at the same absolute positions (``key_positions``)
-- while ``get_seq_length`` stays the position of the next token, and decoding continues at the
right positions.  Caches that cannot (sinks that must stay, importance-selected tokens, a paged
view of complete sequences) refuse with an error that says what to use instead, and change
nothing.  Writing before the first kept position, and rolling back below it, are refused.
The model-level proof (a decoder continuing after ``crop`` attends exactly to the kept tokens)
is ``test_cache_equivalence.py::test_decoding_after_crop_attends_exactly_to_the_kept_positions``;
the random-workload oracle is ``test_kv_cache_properties.py``.
"""

from __future__ import annotations

import pytest
import torch

from kv_cache import (AdvancedKVCache, CacheConfig, DynamicKVCache, EncoderDecoderCache, FixedShapeKVCache,
                      LinearKVCache, PagedCacheView, QuantizedKVCache, SinkKVCache, SlidingWindowKVCache,
                      StaticKVCache, SubStaticCache)

B, H, D, LAYERS = 2, 2, 4, 2


def _static(cls=StaticKVCache, layout="bhsd", rows=B):
    return cls(max_cache_len=10, num_layers=LAYERS, num_heads=H, head_dim=D, max_batch_size=rows, layout=layout)


def _sub():
    pool = _static(rows=B + 2)
    for l in range(LAYERS):
        junk = torch.full((B + 2, H, 10, D), -7.0)
        pool.update(junk, junk, l)  # garbage in the rows the sub-cache does not own
    return SubStaticCache(pool, 1, B)


#: caches that can keep the most recent tokens (name -> factory, layout)
KEEPERS = {
    "dynamic-bhsd": (lambda: DynamicKVCache(initial_capacity=2), "bhsd"),
    "dynamic-bshd": (lambda: DynamicKVCache(layout="bshd"), "bshd"),
    "static-bhsd": (_static, "bhsd"),
    "static-bshd": (lambda: _static(layout="bshd"), "bshd"),
    "substatic": (_sub, "bhsd"),
    "fixed-shape": (lambda: _static(FixedShapeKVCache), "bhsd"),
    "encoder-decoder": (lambda: EncoderDecoderCache(), "bhsd"),
    "sliding-window": (lambda: SlidingWindowKVCache(window=6), "bhsd"),
    "zero-sinks": (lambda: SinkKVCache(num_sink_tokens=0, window=6), "bhsd"),
    "quantized": (lambda: QuantizedKVCache(nbits=8, group_size=4, residual_length=2), "bhsd"),
}


def tokens(n, start, layout):
    """Keys/values whose every entry names its token: ``position + 0.25 * head`` (values negated)."""
    k = (torch.arange(start, start + n, dtype=torch.float32).view(1, 1, n, 1) + 0.25 * torch.arange(H).view(1, H, 1, 1))
    k = k.expand(B, H, n, D).clone()
    if layout == "bshd":
        k = k.transpose(1, 2).contiguous()
    return k, -k


def feed(cache, n, start, layout):
    for l in range(LAYERS):
        cache.update(*tokens(n, start, layout), l)


def held(cache, l, layout):
    """``(positions, keys, values)`` the layer holds, sorted by position, keys/values in bhsd."""
    stored = cache.get(l)
    if stored is None:
        return [], None, None
    k, v = stored
    if layout == "bshd":
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    pos = cache.key_positions(l).cpu()
    order = pos.argsort()
    return pos[order].tolist(), k[:, :, order], v[:, :, order]


def assert_holds(cache, layout, positions, next_position):
    for l in range(LAYERS):
        pos, k, v = held(cache, l, layout)
        assert pos == positions, f"layer {l} holds {pos}, expected {positions}"
        if positions:
            want_k, want_v = tokens(len(positions), positions[0], "bhsd")
            torch.testing.assert_close(k, want_k, atol=0.02, rtol=0)  # quantized: 8-bit steps of 0.75/255 * 2
            torch.testing.assert_close(v, want_v, atol=0.02, rtol=0)
        assert cache.get_seq_length(l) == next_position


@pytest.mark.parametrize("name", list(KEEPERS))
def test_crop_keeps_exactly_the_most_recent_tokens_and_positions_continue(name):
    factory, layout = KEEPERS[name]
    cache = factory()
    feed(cache, 7, 0, layout)
    feed(cache, 1, 7, layout)
    feed(cache, 1, 8, layout)  # 9 tokens seen (the window caches hold the last 6)
    before = [held(cache, l, layout) for l in range(LAYERS)]
    cache.crop(4)
    assert_holds(cache, layout, [5, 6, 7, 8], 9)
    for l in range(LAYERS):  # exactly the tensors held before, not recomputed ones
        pos, k, v = held(cache, l, layout)
        assert torch.equal(k, before[l][1][:, :, -4:]) and torch.equal(v, before[l][2][:, :, -4:])
    assert not cache.is_lossless  # a model must mask by key_positions from now on
    feed(cache, 1, 9, layout)  # appending continues at position 9
    assert_holds(cache, layout, [5, 6, 7, 8, 9], 10)
    cache.crop(100)  # keeping more than is held changes nothing
    assert_holds(cache, layout, [5, 6, 7, 8, 9], 10)
    cache.crop(2)
    assert_holds(cache, layout, [8, 9], 10)
    feed(cache, 3, 10, layout)  # a chunk after a crop
    assert_holds(cache, layout, [8, 9, 10, 11, 12], 13)
    cache.crop(0)
    assert all(cache.get(l) is None for l in range(LAYERS)) and cache.get_seq_length(0) == 13
    feed(cache, 1, 13, layout)
    assert_holds(cache, layout, [13], 14)
    cache.reset()
    assert cache.get_seq_length(0) == 0 and cache.get(0) is None
    assert cache.is_lossless == (name not in ("sliding-window", "zero-sinks", "quantized"))  # the crop is forgotten
    feed(cache, 2, 0, layout)
    assert_holds(cache, layout, [0, 1], 2)


@pytest.mark.parametrize("name", ["dynamic-bhsd", "static-bshd", "substatic", "fixed-shape", "encoder-decoder",
                                  "quantized"])
def test_writes_before_and_rollbacks_below_the_first_kept_position_are_refused(name):
    factory, layout = KEEPERS[name]
    cache = factory()
    feed(cache, 8, 0, layout)
    cache.crop(3)  # holds 5, 6, 7
    if name != "quantized":  # (a quantized cache only appends anyway)
        with pytest.raises(ValueError, match=r"cache_position=\[4\] writes before position 5 of layer 0, but crop\(\) "
                                             r"dropped positions 0..4: expected positions >= 5"):
            cache.update(*tokens(1, 4, layout), 0, cache_position=torch.tensor([4]))
        cache.update(*tokens(1, 5, layout), 0, cache_position=torch.tensor(5))  # overwrite a kept position: fine
        cache.update(*tokens(1, 5, layout), 1, cache_position=torch.tensor(5))
    with pytest.raises(ValueError, match=r"rollback\(4\) would keep positions 0..3 of layer 0, but crop\(\) already "
                                         r"dropped positions 0..4: expected a length in \[5, 8\]"):
        cache.rollback(4)
    assert_holds(cache, layout, [5, 6, 7], 8)  # the refused calls changed nothing
    cache.rollback(6)  # within what is held: keeps positions 5 (the first kept) .. 5
    assert_holds(cache, layout, [5], 6)
    cache.rollback(-1)  # down to the first kept position: empty, positions still counted
    assert cache.get(0) is None and cache.get_seq_length(0) == 5
    feed(cache, 1, 5, layout)
    assert_holds(cache, layout, [5], 6)


def test_static_crop_frees_room_for_positions_past_max_cache_len():
    cache = _static()  # 10 slots
    feed(cache, 10, 0, "bhsd")
    cache.crop(2)
    feed(cache, 8, 10, "bhsd")  # positions 10..17 in slots 2..9
    assert_holds(cache, "bhsd", list(range(8, 18)), 18)
    with pytest.raises(ValueError, match=r"current length 10 \(positions 8..\), 1 new token\(s\) reaching position 18 "
                                         r"need 11 slots, but the capacity is max_cache_len=10"):
        cache.update(*tokens(1, 18, "bhsd"), 0)


def test_fixed_shape_rollback_moves_the_host_length_and_set_seq_length_refuses_a_cropped_cache():
    cache = _static(FixedShapeKVCache)
    for l in range(LAYERS):
        cache.write(l, *tokens(5, 0, "bhsd"), torch.arange(5))
    cache.set_seq_length(5, B)
    cache.rollback(3)  # the speculative drafter's undo: host bookkeeping only
    assert cache.get_seq_length(0) == 3 and torch.equal(cache.keys[0][:, :, 3:5], tokens(2, 3, "bhsd")[0])
    cache.crop(2)
    assert_holds(cache, "bhsd", [1, 2], 3)
    with pytest.raises(ValueError, match=r"set_seq_length\(3\) treats slots as positions, but crop\(\) dropped the first "
                                         r"\[1, 1\] position\(s\) per layer; expected an uncropped cache"):
        cache.set_seq_length(3)
    cache.reset()
    cache.set_seq_length(0)
    assert cache.is_lossless and cache.get_seq_length(0) == 0


@pytest.mark.parametrize("bad, exc, match", [
    (-1, ValueError, r"crop\(max_length\) keeps the most recent max_length tokens, so max_length must be >= 0, got -1; "
                     r"to drop tokens from the end use rollback\(-1\)"),
    (1.5, TypeError, r"crop\(max_length\) takes an int, got float"),
    (True, TypeError, r"crop\(max_length\) takes an int, got bool"),
])
@pytest.mark.parametrize("name", list(KEEPERS))
def test_crop_argument_errors(name, bad, exc, match):
    cache = KEEPERS[name][0]()
    feed(cache, 3, 0, KEEPERS[name][1])
    with pytest.raises(exc, match=match):
        cache.crop(bad)


# ----------------------------------------------------------------------------- caches that refuse
def test_sink_cache_refuses_a_crop_that_would_drop_its_sinks():
    cache = SinkKVCache(num_sink_tokens=2, window=4)
    feed(cache, 9, 0, "bhsd")  # holds 0, 1 (sinks) and 5..8
    with pytest.raises(ValueError, match=r"crop\(4\) on layer 0: a SinkKVCache keeps its first num_sink_tokens=2 "
                                         r"tokens for good .* expected max_length >= 6\. Use "
                                         r"SlidingWindowKVCache\(window=4\) to keep only recent tokens"):
        cache.crop(4)
    cache.crop(6)  # holds exactly 6: a no-op is fine
    assert cache.stored_positions(0).tolist() == [0, 1, 5, 6, 7, 8] and cache.get_seq_length(0) == 9


def test_linear_cache_refuses_a_crop_unless_it_is_a_no_op():
    cache = LinearKVCache(keep_window_size=3)
    for l in range(LAYERS):
        cache.update(*tokens(5, 0, "bhsd"), l, importance=torch.randn(B, H, 5))
    with pytest.raises(ValueError, match=r"crop\(2\) on layer 0: a LinearKVCache keeps the 3 most important tokens per "
                                         r"row and head .* expected max_length >= 3\. Bound its memory with "
                                         r"keep_window_size"):
        cache.crop(2)
    cache.crop(3)
    assert cache.get_cache_info()["cached_tokens"] == 3 and cache.get_seq_length(0) == 5


def test_paged_view_refuses_a_crop_unless_it_is_a_no_op():
    manager = AdvancedKVCache(CacheConfig(max_batch_size=4, max_sequence_length=32, embed_dim=H * D, num_heads=H,
                                          num_layers=1, block_size=4, memory_limit_mb=1))
    view = PagedCacheView(manager, ["a", "b"])
    view.update(*tokens(6, 0, "bhsd"), 0)
    with pytest.raises(ValueError, match=r"crop\(2\): layer 0 of this PagedCacheView holds 6 tokens per row, and a view "
                                         r"serves complete sequences only, so it cannot keep just the 2 most recent; "
                                         r"expected max_length >= 6\. Use rollback\(2\) to keep the first 2"):
        view.crop(2)
    view.crop(6)
    assert view.get_seq_length() == 6
    view.rollback(2)  # the old meaning of crop: keep the first 2
    assert view.get_seq_length() == 2 and torch.equal(view.get(0)[0], tokens(2, 0, "bhsd")[0])
