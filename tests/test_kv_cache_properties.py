"""Property tests: random op sequences on every cache must match the naive oracle exactly.

Each example builds a cache and a ``ReferenceCache`` and applies the same random sequence of
``update`` (all cache_position modes) / ``crop`` (keep the most recent tokens) / ``rollback``
(keep the first positions) / ``reorder_cache`` / ``batch_select_indices`` /
``batch_repeat_interleave`` / ``reset``.  After every op the cache's ``get``/``update`` results
must be ``torch.equal`` to the oracle's, and the lengths, ``key_positions`` and ``is_lossless``
must agree.  Overflowing a static cache must raise ``CacheCapacityError``, writing before the
first position a crop kept and rolling back below it must raise ``ValueError``; none of them
may change anything.
"""

from contextlib import nullcontext

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kv_cache import CacheCapacityError, DynamicKVCache, EncoderDecoderCache, StaticKVCache, SubStaticCache
from reference_cache import ReferenceCache

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
OPS = ["update"] * 5 + ["crop", "rollback", "select", "reorder", "repeat", "reset"]
DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float32)]
UPDATE_MODES = ["append", "0d", "1d_contig", "1d_perm", "2d"]


def assert_pair_equal(got, want, what):
    if want is None:
        assert got is None, f"{what}: expected None, got a tensor pair"
        return
    assert got is not None, f"{what}: expected tensors, got None"
    for g, w, name in zip(got, want, ("keys", "values")):
        assert g.shape == w.shape and g.dtype == w.dtype, f"{what} {name}: {g.shape}/{g.dtype} vs {w.shape}/{w.dtype}"
        assert torch.equal(g, w), f"{what} {name} differ"


class Target:
    """One cache under test, its oracle and the limits the op generator must know."""

    def __init__(self, cache, oracle, shape_kv, num_layers, max_batch, max_len=None, allow_rebatch=True):
        self.cache, self.oracle = cache, oracle
        self.shape_kv = shape_kv  # (heads, k_dim, v_dim, k_dtype, v_dtype)
        self.num_layers, self.max_batch, self.max_len = num_layers, max_batch, max_len
        self.allow_rebatch = allow_rebatch  # may the batch change once every layer is empty?

    def kv(self, gen, batch, seq):
        heads, dk, dv, kt, vt = self.shape_kv
        def make(d, dt):
            shape = (batch, heads, seq, d) if self.oracle.sd == 2 else (batch, seq, heads, d)
            return torch.randn(shape, generator=gen).to(dt)
        return make(dk, kt), make(dv, vt)

    def check(self):
        for l in range(self.num_layers):
            assert self.cache.get_seq_length(l) == self.oracle.get_seq_length(l), f"length of layer {l}"
            assert_pair_equal(self.cache.get(l), self.oracle.get(l), f"get({l})")
            assert torch.equal(self.cache.key_positions(l).cpu(), self.oracle.key_positions(l)), f"key_positions({l})"
        assert self.cache.is_lossless == self.oracle.is_lossless

    def lengths(self):
        return [self.oracle.get_seq_length(l) for l in range(self.num_layers)]

    def batch_for_update(self, data):
        b = self.oracle.batch
        if b is None or (self.allow_rebatch and not any(self.lengths())):
            return data.draw(st.integers(1, self.max_batch), label="batch")
        return b


def draw_positions(data, mode, batch, length, lo=0):
    """``(seq, cache_position)`` for one update of a layer whose next position is ``length``;
    positions are drawn from ``lo`` on."""
    if mode == "append":
        return data.draw(st.integers(1, 3), label="seq"), None
    if mode == "0d":
        return 1, torch.tensor(data.draw(st.integers(lo, length + 2), label="pos"))
    seq = data.draw(st.integers(1, 3), label="seq")
    if mode == "1d_contig":
        start = data.draw(st.integers(lo, length + 1), label="start")
        return seq, torch.arange(start, start + seq)
    pool = list(range(lo, length + 4))
    if mode == "1d_perm":
        return seq, torch.tensor(data.draw(st.permutations(pool), label="perm")[:seq])
    rows = [data.draw(st.permutations(pool), label="row perm")[:seq] for _ in range(batch)]
    return seq, torch.tensor(rows)


def end_of(seq, pos, length):
    return length + seq if pos is None else int(pos.max()) + 1


def run_update(data, gen, t: Target):
    layer = data.draw(st.integers(0, t.num_layers - 1), label="layer")
    batch = t.batch_for_update(data)
    n, first = t.oracle.get_seq_length(layer), t.oracle.first_position(layer)
    mode = data.draw(st.sampled_from(UPDATE_MODES), label="mode")
    below = first > 0 and data.draw(st.integers(0, 4), label="may write below first") == 0
    seq, pos = draw_positions(data, mode, batch, n, lo=0 if below else first)
    event(f"update {mode}" + (" after crop" if first else ""))
    k, v = t.kv(gen, batch, seq)
    if pos is not None and int(pos.min()) < first:
        with pytest.raises(ValueError, match=rf"crop\(\) dropped positions 0..{first - 1}: expected positions >= {first}"):
            t.cache.update(k, v, layer, cache_position=pos)
        event("write before the first kept position")
        return
    if t.max_len is not None and end_of(seq, pos, n) - first > t.max_len:
        with pytest.raises(CacheCapacityError, match="max_cache_len"):
            t.cache.update(k, v, layer, cache_position=pos)
        event("capacity error")
        return
    got = t.cache.update(k, v, layer, cache_position=pos)
    want = t.oracle.update(k, v, layer, cache_position=pos)
    assert_pair_equal(got, want, f"update(layer={layer}, cache_position={pos})")


def run_op(data, gen, t: Target, op):
    """Apply ``op`` to ``t.cache`` and ``t.oracle``; return the args used (for extra oracles)."""
    b = t.oracle.batch
    if op == "update":
        run_update(data, gen, t)
        return None
    if op == "crop":  # keep the most recent tokens
        m = max(t.oracle._length(l) for l in range(t.num_layers)) + 1
        arg = data.draw(st.sampled_from([0]) | st.integers(0, m), label="crop")  # emptying is the edge case
        t.cache.crop(arg)
        t.oracle.crop(arg)
        return arg
    if op == "rollback":  # keep the first positions
        m = max(t.lengths()) + 1
        arg = data.draw(st.sampled_from([0, -m]) | st.integers(-m, m), label="rollback")
        try:
            t.oracle.rollback(arg)
        except ValueError:  # below a crop's first position: refused, nothing changes
            event("rollback below the first kept position")
            with pytest.raises(ValueError, match=r"crop\(\) already dropped positions"):
                t.cache.rollback(arg)
            return arg
        t.cache.rollback(arg)
        return arg
    if op == "reset":
        t.cache.reset()
        t.oracle.reset()
        return None
    if b is None:  # nothing stored yet: batch ops are no-ops on both
        getattr(t.cache, "batch_repeat_interleave" if op == "repeat" else "batch_select_indices")(
            2 if op == "repeat" else [0])
        return None
    if op == "repeat":
        r = data.draw(st.integers(1, 3 if t.max_len else max(1, 6 // b)), label="repeats")
        too_big = t.max_len is not None and b * r > t.max_batch  # only static caches have a row limit
        with pytest.raises(CacheCapacityError, match="max_batch_size") if too_big else nullcontext():
            t.cache.batch_repeat_interleave(r)
        if too_big:
            return None
        t.oracle.batch_repeat_interleave(r)
        return r
    if op == "reorder":
        idx = data.draw(st.permutations(list(range(b))), label="beam_idx")
        t.cache.reorder_cache(torch.tensor(idx))
    else:
        idx = data.draw(st.lists(st.integers(0, b - 1), min_size=1, max_size=t.max_batch), label="indices")
        t.cache.batch_select_indices(idx)
    t.oracle.batch_select_indices(idx)
    return idx


def drive(data, targets, n_ops=20):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    for _ in range(data.draw(st.integers(1, n_ops), label="n_ops")):
        t = targets[data.draw(st.integers(0, len(targets) - 1), label="target")] if len(targets) > 1 else targets[0]
        run_op(data, gen, t, data.draw(st.sampled_from(OPS), label="op"))
        for t in targets:
            t.check()


@SETTINGS
@given(data=st.data(), layout=st.sampled_from(["bhsd", "bshd"]), num_layers=st.integers(1, 3),
       initial_capacity=st.integers(1, 4), growth=st.sampled_from([1.5, 2.0]), heads=st.integers(1, 2),
       dims=st.sampled_from([(2, 2), (2, 3)]), dtypes=st.sampled_from(DTYPE_PAIRS))
def test_dynamic_matches_oracle(data, layout, num_layers, initial_capacity, growth, heads, dims, dtypes):
    cache = DynamicKVCache(layout=layout, initial_capacity=initial_capacity, growth_factor=growth)
    drive(data, [Target(cache, ReferenceCache(layout), (heads, *dims, *dtypes), num_layers, max_batch=4)])


def static_config(data):
    kv_heads = data.draw(st.sampled_from([1, 2]), label="kv_heads")
    kt, vt = data.draw(st.sampled_from(DTYPE_PAIRS), label="dtypes")
    return dict(max_cache_len=data.draw(st.integers(3, 9), label="max_cache_len"),
                num_layers=data.draw(st.integers(1, 3), label="num_layers"),
                num_heads=kv_heads * data.draw(st.sampled_from([1, 2]), label="groups"), num_kv_heads=kv_heads,
                head_dim=2, k_dtype=kt, v_dtype=vt, layout=data.draw(st.sampled_from(["bhsd", "bshd"])))


def static_target(cache, cfg, max_batch):
    shape = (cfg["num_kv_heads"], cfg["head_dim"], cfg["head_dim"], cfg["k_dtype"], cfg["v_dtype"])
    return Target(cache, ReferenceCache(cfg["layout"]), shape, cfg["num_layers"], max_batch, cfg["max_cache_len"])


@SETTINGS
@given(data=st.data())
def test_static_matches_oracle(data):
    cfg = static_config(data)
    max_batch = data.draw(st.integers(1, 4), label="max_batch_size")
    cache = StaticKVCache(max_batch_size=max_batch, **cfg)
    for buf in cache.keys + cache.values:  # never-written slots must read as zeros regardless
        buf.fill_(-7)
    drive(data, [static_target(cache, cfg, max_batch)])


@SETTINGS
@given(data=st.data())
def test_sub_static_caches_share_a_pool_without_interference(data):
    cfg = static_config(data)
    parent = StaticKVCache(max_batch_size=6, **cfg)
    for buf in parent.keys + parent.values:
        buf.fill_(-7)  # garbage the sub-caches must never show
    subs = [SubStaticCache(parent, 1, 2), SubStaticCache(parent, 3, 3)]  # row 0 belongs to nobody
    targets = [static_target(s, cfg, s.length) for s in subs]
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    for _ in range(data.draw(st.integers(1, 12), label="n_ops")):
        i = data.draw(st.integers(0, 1), label="target")
        lo, hi = subs[i].start_idx, subs[i].start_idx + subs[i].length
        before = [(buf[:lo].clone(), buf[hi:].clone()) for buf in parent.keys + parent.values]
        run_op(data, gen, targets[i], data.draw(st.sampled_from(OPS), label="op"))
        for (a, b), buf in zip(before, parent.keys + parent.values):
            assert torch.equal(a, buf[:lo]) and torch.equal(b, buf[hi:]), "a sub-cache wrote outside its rows"
        for t in targets:
            t.check()


@SETTINGS
@given(data=st.data(), static=st.booleans())
def test_encoder_decoder_self_part_matches_oracle(data, static):
    if static:
        cfg = static_config(data)
        mk = lambda: StaticKVCache(max_batch_size=4, **cfg)  # noqa: E731
        self_t = static_target(None, cfg, 4)
    else:
        mk = DynamicKVCache
        self_t = Target(None, ReferenceCache(), (2, 2, 2, torch.float32, torch.float32), 2, max_batch=4)
    edc = EncoderDecoderCache(mk(), mk())
    self_t.cache, self_t.allow_rebatch = edc, False
    cross = ReferenceCache(self_t.oracle.layout)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    for _ in range(data.draw(st.integers(1, 12), label="n_ops")):
        op = data.draw(st.sampled_from(OPS + ["set_cross"] * 2), label="op")
        if self_t.oracle.batch is None and cross.batch is not None:
            self_t.oracle.batch = cross.batch  # the decoder batch must match the source batch
        if op == "set_cross":
            layer = data.draw(st.integers(0, self_t.num_layers - 1), label="layer")
            batch = self_t.oracle.batch or cross.batch or data.draw(st.integers(1, 4), label="batch")
            k, v = self_t.kv(gen, batch, data.draw(st.integers(1, 3), label="src_len"))
            if edc.has_cross(layer):
                with pytest.raises(ValueError, match=f"layer_idx={layer}.*already stored"):
                    edc.set_cross(layer, k, v)
            else:
                assert_pair_equal(edc.set_cross(layer, k, v), cross.update(k, v, layer), "set_cross")
        else:
            arg = run_op(data, gen, self_t, op)
            if op == "reset":
                cross.reset()
            elif op in ("select", "reorder") and arg is not None:
                cross.batch_select_indices(arg)
            elif op == "repeat" and arg is not None:
                cross.batch_repeat_interleave(arg)
        self_t.check()
        for l in range(self_t.num_layers):
            assert edc.has_cross(l) == (cross.get_seq_length(l) > 0)
            if edc.has_cross(l):
                assert_pair_equal(edc.get_cross(l), cross.get(l), f"get_cross({l})")
