"""``QuantizedKVCache``: per-group min/max quantization is within half a step of the input,
4-bit and 2-bit codes are really packed (``memory_bytes`` counts packed bytes), the newest
``residual_length`` tokens are exact, and a model decoding through the 8-bit cache stays close
to the full-precision logits."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from helpers import tiny_decoder
from kv_cache import DynamicKVCache, QuantizedKVCache, dequantize, quantize
from kv_cache.long_context.quantized import _pack, _unpack


@settings(max_examples=40, deadline=None)
@given(nbits=st.sampled_from([2, 4, 8]), groups=st.integers(1, 4), group_size=st.sampled_from([4, 8, 16]),
       tokens=st.integers(1, 6), scale=st.floats(1e-3, 1e3), offset=st.floats(-50, 50), seed=st.integers(0, 2**16))
def test_quantization_error_is_at_most_half_a_step(nbits, groups, group_size, tokens, scale, offset, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, tokens, groups * group_size, generator=g) * scale + offset
    packed, step, minimum = quantize(x, nbits, group_size)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == groups * group_size * nbits // 8
    assert step.dtype == minimum.dtype == torch.float16 and step.shape[-1] == groups
    err = (x - dequantize(packed, step, minimum, nbits)).abs()
    bound = step.float().repeat_interleave(group_size, -1) / 2
    # plus float32 rounding of the dequantized value itself (a few ulps of |x|: 4e-6 at |x| = 32)
    assert bool((err <= bound * (1 + 1e-5) + 1e-6 + 4 * torch.finfo(torch.float32).eps * x.abs()).all())
    # No needlessly coarse step: (max - min) / levels, widened only by storing min and step in
    # float16 (min rounded down and step rounded up, by at most one float16 spacing each).
    grouped = x.unflatten(-1, (groups, group_size)).float()
    lo, hi = grouped.amin(-1), grouped.amax(-1)
    eps16, tiny16 = torch.finfo(torch.float16).eps, 6e-8  # relative spacing; smallest subnormal
    widest = (hi - lo + eps16 * lo.abs() + tiny16) / (2 ** nbits - 1) * (1 + eps16) + tiny16
    assert bool((step.float() <= widest * (1 + 1e-6)).all())


@pytest.mark.parametrize("nbits", [2, 4, 8])
def test_packing_round_trips(nbits):
    codes = torch.randint(0, 2 ** nbits, (3, 5, 16), dtype=torch.uint8)
    packed = _pack(codes, nbits)
    assert packed.shape == (3, 5, 16 * nbits // 8) and torch.equal(_unpack(packed, nbits), codes)


@pytest.mark.parametrize("nbits", [2, 4, 8])
def test_memory_bytes_are_the_real_packed_bytes(nbits):
    B, H, D, G, R, T = 2, 3, 64, 32, 16, 100
    cache, full = QuantizedKVCache(nbits=nbits, group_size=G, residual_length=R), DynamicKVCache()
    k = torch.randn(B, H, T, D)
    cache.update(k, k, 0)
    full.update(k, k, 0)
    per_token = B * H * (D * nbits // 8 + 2 * 2 * D // G)  # packed codes + fp16 scale and minimum per group
    assert cache.quantized_length(0) == T - R
    window = 2 * B * H * (R + 1) * D * 4  # the exact window's buffer: R tokens + room for the next one
    assert cache.memory_bytes() == 2 * 256 * per_token + window  # one block of 256 tokens
    assert cache.bytes_per_token() == 2 * per_token
    k = torch.randn(B, H, 300, D)
    cache.update(k, k, 0)
    full.update(k, k, 0)  # 400 tokens: 384 quantized in two blocks, 16 exact
    assert cache.memory_bytes() == 2 * 512 * per_token + window < full.memory_bytes()
    assert full.memory_bytes() / T / cache.bytes_per_token() > {8: 3.5, 4: 6.3, 2: 10.6}[nbits]


def test_recent_tokens_are_exact_and_older_ones_within_the_bound():
    """Decoding token by token with residual_length 5: the newest 3..5 tokens are exact (the window
    is cut back to its newest 3 when it overflows), older ones within half a step."""
    cache, history, buffers = QuantizedKVCache(nbits=4, group_size=8, residual_length=5), [], set()
    for t in range(20):
        k = torch.randn(1, 2, 1, 16)
        history.append(k)
        keys, values = cache.update(k, 2 * k, 0)
        buffers.add(cache._wk[0].data_ptr())
        full = torch.cat(history, dim=2)
        assert keys.shape == full.shape and cache.get_seq_length() == t + 1
        exact = t + 1 - cache.quantized_length()
        assert exact == t + 1 if t < 5 else 3 <= exact <= 5
        assert torch.equal(keys[:, :, -exact:], full[:, :, -exact:])
        assert torch.equal(values[:, :, -exact:], 2 * full[:, :, -exact:])
        old = full[:, :, :-exact]
        if old.numel():
            assert not torch.equal(keys[:, :, :-exact], old)  # 4-bit codes: really quantized
            span = old.unflatten(-1, (2, 8))
            step = (span.amax(-1) - span.amin(-1)) / 15
            assert bool(((keys[:, :, :-exact] - old).abs() <= step.repeat_interleave(8, -1) * 0.51 + 1e-3).all())
    assert cache.quantized_length() == 15  # flushes of 3 tokens at 6, 9, 12, 15, 18 held: 15 quantized, 5 exact
    assert len(buffers) == 1  # every token was written into one window buffer, in place
    cache.update(torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16), 0)  # a multi-token append: exactly 5 stay
    assert cache.get_seq_length() - cache.quantized_length() == 5


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_model_logits_teacher_forced(pos):
    model = tiny_decoder("gqa", pos)
    ids = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(0))
    ref = model(ids)
    errors = {}
    for nbits in (8, 4):
        cache, out, t = QuantizedKVCache(nbits=nbits, group_size=8, residual_length=4), [], 0
        for S in [6] + [1] * 34:
            out.append(model(ids[:, t:t + S], cache=cache))
            t += S
        errors[nbits] = (torch.cat(out, 1) - ref).abs().max().item()
    assert errors[8] < 0.03 * ref.abs().max().item() and errors[8] < errors[4]
    # a residual window covering everything quantizes nothing: exactly the full-precision logits
    exact = model.generate(ids[:1, :5], 20, cache_implementation="quantized", output_logits=True, eos_token_id=None,
                           cache_config={"residual_length": 64, "group_size": 8})
    plain = model.generate(ids[:1, :5], 20, output_logits=True, eos_token_id=None)
    torch.testing.assert_close(exact.logits, plain.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("call, match", [
    (lambda: QuantizedKVCache(nbits=3), r"nbits must be one of \(2, 4, 8\).*got 3"),
    (lambda: QuantizedKVCache(nbits=16), "got 16"),
    (lambda: QuantizedKVCache(group_size=0), "group_size must be a positive int, got 0"),
    (lambda: QuantizedKVCache(residual_length=-1), "residual_length must be a non-negative int, got -1"),
    (lambda: QuantizedKVCache(group_size=32).update(torch.randn(1, 1, 1, 48), torch.randn(1, 1, 1, 48), 0),
     "group_size=32 must divide the head dim 48"),
    (lambda: quantize(torch.randn(4, 6), 4, 4), "dividing the last dim 6"),
    (lambda: QuantizedKVCache(nbits=2, group_size=2).update(torch.randn(1, 1, 1, 6), torch.randn(1, 1, 1, 6), 0),
     "multiple of 4"),
])
def test_invalid_bit_widths_and_shapes_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_only_appends_rollback_batch_ops_and_reset():
    cache = QuantizedKVCache(nbits=8, group_size=4, residual_length=2)
    k = torch.randn(3, 1, 6, 4)
    cache.update(k, k, 0)
    with pytest.raises(ValueError, match="only appends"):
        cache.update(k[:, :, :1], k[:, :, :1], 0, cache_position=torch.tensor([2]))
    cache.rollback(5)
    assert cache.get_seq_length() == 5 and cache.quantized_length() == 4
    cache.rollback(3)
    assert cache.get_seq_length() == 3 and cache.get(0)[0].shape == (3, 1, 3, 4)
    before = cache.get(0)[0]
    cache.batch_select_indices([2, 0])
    torch.testing.assert_close(cache.get(0)[0], before[[2, 0]])
    cache.batch_repeat_interleave(3)
    assert cache.get(0)[0].shape == (6, 1, 3, 4)
    assert torch.equal(cache.key_positions(0), torch.arange(3))
    cache.reset()
    assert cache.get(0) is None and cache.memory_bytes() == 0


# ---------------------------------------------------------------------------- blockwise attention (#18)
class DequantizeEverything(QuantizedKVCache):
    """The definition before #18, kept as the reference: no ``attend``, so the model calls
    ``update``, which returns the whole history dequantized, and runs SDPA over it."""

    attend = None


@pytest.mark.parametrize("nbits", [8, 4, 2])
@pytest.mark.parametrize("block", [1, 3, 16, 4096])
@pytest.mark.parametrize("heads, kv_heads, S, residual", [(4, 2, 1, 5), (4, 4, 7, 0), (6, 2, 40, 3), (2, 1, 1, 0)])
def test_blockwise_attention_equals_attention_over_the_dequantized_history(nbits, block, heads, kv_heads, S, residual):
    g = torch.Generator().manual_seed(nbits * 100 + block)
    B, D, n = 2, 16, 90
    cache = QuantizedKVCache(nbits=nbits, group_size=8, residual_length=residual)
    k, v = torch.randn(B, kv_heads, n, D, generator=g), torch.randn(B, kv_heads, n, D, generator=g)
    cache.store(k[:, :, :n - S], v[:, :, :n - S], 0)
    K, V = cache.update(k[:, :, n - S:], v[:, :, n - S:], 0)  # the old path: everything dequantized
    q = torch.randn(B, heads, S, D, generator=g)
    causal = torch.ones(S, n, dtype=torch.bool).tril(n - S)
    padding = torch.rand(B, 1, 1, n, generator=g) > 0.2
    padding[..., -1] = True
    for mask, is_causal in [(None, False), (None, True), (padding, False), (padding & causal, False)]:
        want = torch.nn.functional.scaled_dot_product_attention(
            q, K, V, attn_mask=causal if is_causal else mask, enable_gqa=True)
        got = cache.attend(q, 0, mask=mask, is_causal=is_causal, block=block)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=0)
    additive = torch.zeros(B, heads, S, n).masked_fill_(~padding.expand(B, heads, S, n), float("-inf"))
    want = torch.nn.functional.scaled_dot_product_attention(q, K, V, attn_mask=additive, enable_gqa=True)
    torch.testing.assert_close(cache.attend(q, 0, mask=additive, block=block), want, atol=2e-6, rtol=0)


def test_blockwise_attention_after_crop_and_rollback():
    cache = QuantizedKVCache(nbits=4, group_size=8, residual_length=4)
    k = torch.randn(1, 2, 300, 16)
    cache.update(k, -k, 0)
    for change in (lambda: cache.crop(200), lambda: cache.rollback(150)):
        change()
        K, V = cache.get(0)
        q = torch.randn(1, 2, 1, 16)
        want = torch.nn.functional.scaled_dot_product_attention(q, K, V)
        torch.testing.assert_close(cache.attend(q, 0, block=64), want, atol=2e-6, rtol=0)


@pytest.mark.parametrize("pos", ["rope", "learned"])
@pytest.mark.parametrize("nbits", [8, 4])
def test_model_through_attend_equals_the_old_dequantize_everything_path(pos, nbits):
    """Teacher-forced logits (prompt chunks, then tokens) and generate() with a left-padded batch:
    the model's blockwise path gives the logits of the old path within float32 rounding.  One
    layer: with two, a 1e-7 difference in layer 1's keys can move one of them across a rounding
    boundary of its quantization and change that code by a whole step (tested below, looser)."""
    model = tiny_decoder("gqa", pos, n_layers=1)
    ids = torch.randint(0, 61, (2, 60), generator=torch.Generator().manual_seed(1))
    make = dict(nbits=nbits, group_size=8, residual_length=4)
    new, old, got, want, t = QuantizedKVCache(**make), DequantizeEverything(**make), [], [], 0
    for S in [9, 1, 1, 13] + [1] * 37:
        got.append(model(ids[:, t:t + S], cache=new))
        want.append(model(ids[:, t:t + S], cache=old))
        t += S
    assert new.quantized_length() == 56  # 60 tokens: 4 exact at the end (2..4 while decoding)
    got, want = torch.cat(got, 1), torch.cat(want, 1)
    # float32 rounding, amplified by the test model's large weights (logits in the hundreds)
    torch.testing.assert_close(got, want, atol=1e-6 * want.abs().max().item(), rtol=0)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0  # row 1 is left-padded
    kw = dict(attention_mask=mask, output_logits=True, eos_token_id=None, pad_token_id=0)
    a = model.generate(ids[:, :12], 30, cache_implementation=QuantizedKVCache(**make), **kw)
    b = model.generate(ids[:, :12], 30, cache_implementation=DequantizeEverything(**make), **kw)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-6 * b.logits.abs().max().item(), rtol=0)
    assert torch.equal(a.sequences, b.sequences)


def test_attend_refuses_what_it_cannot_do():
    cache = QuantizedKVCache(nbits=8, group_size=4, residual_length=2)
    with pytest.raises(ValueError, match="layer 0 of this QuantizedKVCache holds no tokens"):
        cache.attend(torch.randn(1, 2, 1, 8), 0)
    cache.store(torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8), 0)
    with pytest.raises(ValueError, match="query heads H=3 must be a multiple of the cache's key/value heads H_kv=2"):
        cache.attend(torch.randn(1, 3, 1, 8), 0)
    with pytest.raises(ValueError, match="block must be a positive int .*got 0"):
        cache.attend(torch.randn(1, 2, 1, 8), 0, block=0)
    with pytest.raises(ValueError, match=r"mask must be .*\(\.\., \.\., 1, 10\), got \(1, 1, 1, 9\)"):
        cache.attend(torch.randn(1, 2, 1, 8), 0, mask=torch.ones(1, 1, 1, 9, dtype=torch.bool))


def test_two_layer_model_agrees_with_the_old_path_up_to_code_flips():
    model = tiny_decoder("gqa", "rope")
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(2))
    make = dict(nbits=8, group_size=8, residual_length=4)
    kw = dict(output_logits=True, eos_token_id=None)
    a = model.generate(ids, 40, cache_implementation=QuantizedKVCache(**make), **kw)
    b = model.generate(ids, 40, cache_implementation=DequantizeEverything(**make), **kw)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-3 * b.logits.abs().max().item(), rtol=0)


@pytest.mark.parametrize("nbits", [2, 4])
def test_packing_is_planar(nbits):
    """Byte ``j`` holds channel ``j`` of every plane of ``D / per`` channels, plane ``i`` in bits
    ``i * nbits ..``: what lets both attention paths unpack whole contiguous rows."""
    per, D = 8 // nbits, 16
    codes = torch.randint(0, 2 ** nbits, (2, 3, D), dtype=torch.uint8)
    packed = _pack(codes, nbits)
    for i in range(per):
        plane = codes[..., i * D // per:(i + 1) * D // per]
        assert torch.equal((packed >> (nbits * i)) & (2 ** nbits - 1), plane)


def test_attention_method_is_checked():
    from kv_cache.long_context.quantized_attention import quantized_attention
    cache = QuantizedKVCache(nbits=8, group_size=4, residual_length=2)
    cache.store(torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8), 0)
    keys, values = cache._qk[0].tensors(), cache._qv[0].tensors()
    with pytest.raises(ValueError, match="method must be one of .*got 'fast'"):
        quantized_attention(torch.randn(1, 2, 1, 8), keys, values, 8, 8, method="fast")
    with pytest.raises(ValueError, match="method='triton' reads quantized tokens without a mask; got a mask"):
        quantized_attention(torch.randn(1, 2, 1, 8), keys, values, 8, 8, mask=torch.ones(1, 1, 1, 8, dtype=torch.bool),
                            method="triton")


def test_triton_path_is_chosen_only_where_it_can_serve(monkeypatch):
    """``available`` decides the ``"auto"`` method: a CUDA query (or the interpreter), power-of-two
    head and group counts, at most 64 (query row, group) pairs; anything else takes the block loop."""
    from kv_cache.long_context import quantized_triton as qt
    monkeypatch.setattr(qt, "HAS_TRITON", True)  # as if Triton were installed
    q = torch.randn(1, 2, 1, 128)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not qt.available(q, 8, 32, 128, 1)  # a CPU query
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert qt.available(q, 8, 32, 128, 1) and qt.available(q, 4, 32, 128, 16) and qt.available(q, 2, 16, 64, 16)
    assert not qt.available(q.bfloat16(), 8, 32, 128, 1)  # the interpreter's bfloat16 products are wrong
    assert not qt.available(q, 8, 32, 128, 17)  # 17 rows x 4 groups > 64
    assert qt.available(q, 8, 32, 128, 1, residual=256) and not qt.available(q, 8, 32, 128, 1, residual=257)
    assert not qt.available(q, 8, 32, 96, 1)  # head size not a power of two
    assert not qt.available(q, 8, 24, 96, 1) and not qt.available(q, 8, 8, 8, 1)
    monkeypatch.setattr(qt, "HAS_TRITON", False)
    assert not qt.available(q, 8, 32, 128, 1)


TRITON_CHECK = r'''
import torch
from kv_cache import QuantizedKVCache
from kv_cache.long_context.quantized_attention import quantized_attention
from kv_cache.long_context.quantized_triton import quantized_decode
worst = 0.0
g = torch.Generator().manual_seed(0)
for nbits, D, gs, kv, heads, S, n, res, dtype in [
        (8, 64, 32, 2, 2, 1, 300, 5, torch.float32),    # one row per kv head, an exact tail
        (4, 64, 16, 2, 8, 1, 257, 0, torch.float32),    # GQA: 4 rows x 4 groups, no tail
        (2, 128, 32, 1, 3, 2, 130, 7, torch.float32),   # 2-bit, 3 heads x 2 new tokens
        (4, 32, 32, 3, 3, 1, 70, 3, torch.float16)]:    # half precision: tensor-core products
    cache = QuantizedKVCache(nbits=nbits, group_size=gs, residual_length=res)
    cache.store(torch.randn(2, kv, n, D, generator=g), torch.randn(2, kv, n, D, generator=g), 0)
    for _ in range(res + 3):  # decoding: tokens written into the window's buffer in place, one flush
        cache.store(torch.randn(2, kv, 1, D, generator=g), torch.randn(2, kv, 1, D, generator=g), 0)
    assert res == 0 or cache._rk[0].data_ptr() == cache._wk[0].data_ptr()  # the tail: a prefix of the buffer
    K, V = cache.get(0)
    q = torch.randn(2, heads, S, D, generator=g).to(dtype)
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), K, V, enable_gqa=True)
    got = quantized_attention(q, cache._qk[0].tensors(), cache._qv[0].tensors(), cache.quantized_length(0), nbits,
                              cache._rk[0], cache._rv[0], method="triton")
    assert got.dtype == dtype and got.shape == want.shape
    err = (got.float() - want).abs().max().item()
    assert err < (2e-3 if dtype == torch.float16 else 2e-6), (nbits, D, dtype, err)
    # the kernel's knobs change the schedule, not the answer
    other = quantized_decode(q.reshape(2, kv, heads // kv * S, D), cache._qk[0].tensors(), cache._qv[0].tensors(),
                             cache.quantized_length(0), nbits, cache._rk[0], cache._rv[0], block_n=16,
                             programs_per_sm=1)
    assert (other.reshape(got.shape).float() - got.float()).abs().max().item() < (2e-3 if dtype == torch.float16 else 2e-6)
    worst = max(worst, err)
print("ok", worst)
'''


def test_triton_decode_kernel_equals_attention_over_the_dequantized_history():
    """The GPU kernel, run by Triton's interpreter on this CPU (a fresh interpreter process: the
    interpreter is chosen when the kernels are defined): float32 within rounding, float16 within
    half-precision rounding of ``p``, for 8/4/2 bits, grouped-query heads, several new tokens,
    with and without an exact tail, partial blocks and several slices."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root)
    done = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-3000:]
