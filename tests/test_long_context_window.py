"""``SlidingWindowKVCache``: the ring keeps exactly the tokens a windowed query can see, and a
model with ``config.sliding_window`` gives the same logits with this cache as uncached (fp32,
atol 1e-5), over many steps past the window, for MHA/GQA, learned/rotary positions, batch 1
and a left-padded ragged batch, with prompts shorter and longer than the window."""

from __future__ import annotations

import functools
import random

import pytest
import torch

from helpers import left_pad, tiny_decoder
from kv_cache import SinkKVCache, SlidingWindowKVCache
from transformer import ModelConfig
from transformer.layers import causal_mask

WINDOW, STEPS, ATOL = 8, 48, 1e-5


def naive_returned(t0: int, S: int, sinks: int, window: int):
    """Positions an update of ``S`` tokens at ``t0`` must return: the sinks, the ``window - 1``
    tokens before ``t0`` (what the first new query still sees) and the new tokens."""
    return sorted(set(range(min(sinks, t0 + S))) | set(range(max(0, t0 - window + 1), t0)) | set(range(t0, t0 + S)))


def naive_kept(seen: int, sinks: int, window: int):
    return sorted(set(range(min(sinks, seen))) | set(range(max(0, seen - window), seen)))


@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize("window", [1, 4, 7])
def test_returned_and_kept_positions_match_naive_reference(sinks, window):
    rng = random.Random(window * 10 + sinks)
    cache = SinkKVCache(sinks, window) if sinks else SlidingWindowKVCache(window)
    history, t = [], 0
    for _ in range(25):
        S = rng.choice([1, 1, 1, 2, 5, 11])
        k = torch.randn(2, 3, S, 4)
        history.append(k)
        keys, values = cache.update(k, -k, 0)
        full = torch.cat(history, dim=2)
        pos = cache.key_positions(0)
        assert sorted(pos.tolist()) == naive_returned(t, S, sinks, window)
        assert torch.equal(keys, full[:, :, pos]) and torch.equal(values, -full[:, :, pos])  # slot i holds pos[i]
        ranks = cache.key_positions(0, in_cache=True)
        assert torch.equal(ranks[pos.argsort()], torch.arange(pos.numel()))  # in-cache position = rank in time
        t += S
        assert cache.stored_positions(0).tolist() == naive_kept(t, sinks, window)
        assert cache.get_seq_length(0) == t and cache.stored_length(0) <= sinks + window


def test_decode_step_writes_one_slot_and_returns_a_view():
    cache = SlidingWindowKVCache(window=4)
    cache.update(torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), 0)  # prompt longer than the window
    before = cache.memory_bytes()
    for t in range(6, 20):
        k, _ = cache.update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), 0)
        assert k.shape == (1, 2, 4, 8) and k.data_ptr() == cache.keys[0].data_ptr()  # no copy of the window
        assert sorted(cache.key_positions(0).tolist()) == [t - 3, t - 2, t - 1, t]
    assert cache.memory_bytes() == before == 2 * 2 * 4 * 8 * 4 + 4 * 8  # k, v fp32 + int64 positions


@functools.lru_cache(maxsize=None)
def _model(attn, pos):
    return tiny_decoder(attn, pos, sliding_window=WINDOW)


def _prompts(batch):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 61, (n,), generator=g) for n in ([13] if batch == 1 else [3, 20, 6])]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("pos", ["learned", "rope"])
@pytest.mark.parametrize("attn", ["mha", "gqa"])
def test_windowed_model_cached_equals_uncached(attn, pos, batch):
    model = _model(attn, pos)
    ids, mask = left_pad(_prompts(batch))
    kw = dict(attention_mask=mask, output_logits=True, eos_token_id=None)
    ref = model.generate(ids, STEPS, use_cache=False, **kw)
    out = model.generate(ids, STEPS, cache_implementation="sliding_window", **kw)
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=0)
    assert torch.equal(out.sequences, ref.sequences)


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_chunks_of_any_size_mid_stream_match_uncached(pos):
    model = _model("gqa", pos)
    ids = torch.randint(0, 61, (2, 71), generator=torch.Generator().manual_seed(0))
    ref = model(ids)  # uncached: the windowed causal mask over the whole sequence
    cache, t = SlidingWindowKVCache(WINDOW), 0
    for S in [11, 1, 1, 3, 1, 17, 1, 2, 9, 1, 1, 23]:
        torch.testing.assert_close(model(ids[:, t:t + S], cache=cache), ref[:, t:t + S], atol=ATOL, rtol=0)
        t += S
    assert cache.stored_length(0) == WINDOW and cache.get_seq_length(0) == t


def test_window_mask_and_training_path():
    mask = causal_mask(torch.arange(6), 6, window=3)[0, 0]
    q, k = torch.arange(6)[:, None], torch.arange(6)[None]
    assert torch.equal(mask, (k <= q) & (q - k < 3))
    model = _model("mha", "rope")
    ids = torch.randint(0, 61, (1, WINDOW))  # no key is out of any window: same as full attention
    full = tiny_decoder("mha", "rope")
    torch.testing.assert_close(model(ids), full(ids), atol=ATOL, rtol=0)
    long_ids = torch.randint(0, 61, (1, 3 * WINDOW))
    assert not torch.allclose(model(long_ids), full(long_ids), atol=1e-3)  # the window matters


def test_generate_builds_it_by_name_with_defaults_and_options():
    model = _model("mha", "learned")
    assert model.new_cache("sliding_window").window == WINDOW  # from config.sliding_window
    assert model.new_cache("sliding_window", window=5).window == 5
    plain = tiny_decoder("mha", "learned")
    assert plain.new_cache("sliding_window").window == plain.config.max_seq_len
    ids = torch.randint(0, 61, (1, 4))
    a = model.generate(ids, 20, cache_implementation="sliding_window", cache_config={"window": WINDOW})
    assert torch.equal(a, model.generate(ids, 20, use_cache=False))
    with pytest.raises(ValueError, match="num_sink_tokens"):
        model.generate(ids, 2, cache_implementation="sliding_window", cache_config={"num_sink_tokens": 4})
    with pytest.raises(ValueError, match="bhsd"):
        model.new_cache("sliding_window", layout="bshd")
    with pytest.raises(ValueError, match="cache object"):
        model.generate(ids, 2, cache_implementation=SlidingWindowKVCache(4), cache_config={"window": 4})


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, None])
def test_invalid_windows_raise_naming_the_parameter(bad):
    with pytest.raises(ValueError, match=f"window must be a positive int, got {bad!r}"):
        SlidingWindowKVCache(bad)
    with pytest.raises(ValueError, match="sliding_window"):
        ModelConfig(sliding_window=bad if bad is not None else 0)


def test_invalid_updates_raise_clear_errors():
    cache = SlidingWindowKVCache(4)
    cache.update(torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8), 0)
    with pytest.raises(ValueError, match=r"only appends.*3\.\.3"):
        cache.update(torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8), 0, cache_position=torch.tensor(1))
    with pytest.raises(ValueError, match="batch size 1"):
        cache.update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), 0)
    with pytest.raises(ValueError, match="2 heads of dim 8"):
        cache.update(torch.randn(2, 4, 1, 8), torch.randn(2, 4, 1, 8), 0)
    with pytest.raises(ValueError, match="4-D"):
        cache.update(torch.randn(2, 1, 8), torch.randn(2, 1, 8), 0)
    with pytest.raises(ValueError, match="not been updated"):
        cache.key_positions(5)


def test_rollback_batch_ops_and_reset():
    cache = SlidingWindowKVCache(4)
    k = torch.randn(3, 1, 3, 2)
    cache.update(k, k, 0)
    cache.rollback(-1)  # nothing evicted yet: exact rollback
    assert cache.get_seq_length() == 2 and torch.equal(cache.get(0)[0], k[:, :, :2])
    cache.batch_select_indices([2, 0])
    assert torch.equal(cache.get(0)[0], k[[2, 0], :, :2])
    cache.batch_repeat_interleave(2)
    assert cache.get(0)[0].shape[0] == 4
    cache.update(torch.randn(4, 1, 5, 2), torch.randn(4, 1, 5, 2), 0)  # 7 seen, 4 kept: 3 evicted
    with pytest.raises(ValueError, match="already evicted"):
        cache.rollback(-1)
    cache.rollback(7)  # a no-op is fine
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.memory_bytes() == 0 and cache.get(0) is None


def test_fast_paths_stay_mask_free(monkeypatch):
    """Lossless caches keep SDPA's is_causal prefill and mask-free decode; a window cache decodes
    mask-free too (it only returns keys the new token may see)."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, attn_mask=None, is_causal=False, **kw):
        calls.append((attn_mask is None, is_causal))
        return sdpa(*args, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    ids = torch.randint(0, 61, (1, 6))
    tiny_decoder("mha", "rope").generate(ids, 3, eos_token_id=None)
    assert calls == [(True, True)] * 2 + [(True, False)] * 4  # 2 layers: causal prefill, then 2 mask-free steps
    calls.clear()
    tiny_decoder("mha", "rope").generate(ids, 3, cache_implementation="sliding_window", eos_token_id=None)
    assert calls == [(False, False)] * 2 + [(True, False)] * 4


def test_the_encoder_decoder_model_refuses_long_context_caches():
    from helpers import tiny_seq2seq
    model = tiny_seq2seq()
    with pytest.raises(ValueError, match="decoder-only"):
        model.generate(torch.randint(3, 61, (1, 5)), 3, cache_implementation="sliding_window")
