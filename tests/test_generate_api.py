"""``generate``'s contract: shapes, EOS handling, cache arguments and clear errors; the
tutorial-style ``EnhancedTransformer`` / ``OptimizedTransformer`` API."""

from __future__ import annotations

import pytest
import torch

from helpers import scaled_init, tiny_decoder, tiny_seq2seq
from kv_cache import DynamicKVCache, KVCache, StaticKVCache
from transformer import EnhancedTransformer, GenerateOutput, ModelConfig, OptimizedTransformer


def test_output_shape_prompt_included():
    model = tiny_decoder()
    ids = torch.randint(0, 61, (2, 5))
    out = model.generate(ids, 7, eos_token_id=None)
    assert out.shape == (2, 12) and out.dtype == torch.long
    assert torch.equal(out[:, :5], ids)
    assert torch.equal(model.generate(ids, 0), ids)


def test_eos_stops_rows_and_pads_them():
    model = tiny_decoder()
    ids = torch.randint(0, 61, (3, 4), generator=torch.Generator().manual_seed(0))
    free = model.generate(ids, 30, eos_token_id=None)
    eos = int(free[0, 6])  # the token row 0 produces at its 3rd step
    out = model.generate(ids, 30, eos_token_id=eos, pad_token_id=60)
    for row in range(3):
        gen = out[row, 4:].tolist()
        if eos in gen:
            k = gen.index(eos)
            assert all(t == 60 for t in gen[k + 1:])
            assert gen[:k + 1] == free[row, 4:4 + k + 1].tolist()
    assert 6 < out.shape[1] <= 34


def test_stops_early_when_all_rows_finished():
    model = tiny_decoder()
    ids = torch.randint(0, 61, (1, 4), generator=torch.Generator().manual_seed(0))
    first = int(model.generate(ids, 1, eos_token_id=None)[0, -1])
    out = model.generate(ids, 50, eos_token_id=first)
    assert out.shape == (1, 5)


def test_cache_object_is_filled_and_reusable_after_reset():
    model = tiny_decoder()
    ids = torch.randint(0, 61, (1, 4))
    cache = DynamicKVCache()
    a = model.generate(ids, 10, cache_implementation=cache, eos_token_id=None)
    assert cache.get_seq_length() == 4 + 10 - 1  # the last token is sampled, never fed back
    with pytest.raises(ValueError, match="not empty"):
        model.generate(ids, 10, cache_implementation=cache)
    cache.reset()
    assert torch.equal(model.generate(ids, 10, cache_implementation=cache, eos_token_id=None), a)


def test_static_cache_sized_and_overflow_error():
    model = tiny_decoder()
    c = model.new_cache("static", batch_size=1, max_cache_len=6)
    assert isinstance(c, StaticKVCache) and c.get_max_cache_shape() == 6
    with pytest.raises(ValueError, match="capacity|max_cache_len"):
        model.generate(torch.randint(0, 61, (1, 4)), 10, cache_implementation=c, eos_token_id=None)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.01), "top_p"),
    (dict(top_k=0), "top_k"), (dict(cache_implementation="paged"), "cache_implementation"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
])
def test_invalid_arguments_raise_clear_errors(kwargs, match):
    model = tiny_decoder()
    args = dict(max_new_tokens=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        model.generate(torch.zeros(1, 3, dtype=torch.long), **args)


def test_prompt_longer_than_context_is_refused():
    model = tiny_decoder()  # max_seq_len 128
    with pytest.raises(ValueError, match="max_seq_len=128"):
        model.generate(torch.zeros(1, 129, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.zeros(1, 100, dtype=torch.long), 40)  # learned positions end at 128
    rope = tiny_decoder(pos="rope")
    assert rope.generate(torch.zeros(1, 100, dtype=torch.long), 40).shape == (1, 140)  # RoPE extrapolates


def test_bad_input_ids_and_mask_rejected():
    model = tiny_decoder()
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(torch.zeros(2, 3, dtype=torch.long), 2, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="at least one real"):
        model.generate(torch.zeros(2, 3, dtype=torch.long), 2, attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]]))


def test_config_validation_names_fields():
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="d_model"):
        ModelConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="pos_encoding"):
        ModelConfig(pos_encoding="alibi")


def test_streamer_sees_every_token():
    model = tiny_decoder()
    seen = []
    out = model.generate(torch.randint(0, 61, (2, 3)), 6, streamer=lambda t: seen.append(t.clone()), eos_token_id=None)
    assert torch.equal(torch.stack(seen, 1), out[:, 3:])


def test_output_logits_are_the_raw_logits():
    model = tiny_decoder()
    ids = torch.randint(0, 61, (1, 4))
    out = model.generate(ids, 3, output_logits=True, eos_token_id=None)
    assert isinstance(out, GenerateOutput)
    torch.testing.assert_close(out.logits[:, 0], model(ids)[:, -1])


def test_seq2seq_needs_src_and_bos():
    model = tiny_seq2seq()
    with pytest.raises(ValueError, match="src"):
        from transformer import generate
        generate(model, torch.ones(1, 1, dtype=torch.long), 3)
    no_bos = tiny_seq2seq(bos_token_id=None)
    with pytest.raises(ValueError, match="bos_token_id"):
        no_bos.generate(torch.ones(1, 4, dtype=torch.long), 3)


# ------------------------------------------------------------------- EnhancedTransformer
def _enhanced(cls=EnhancedTransformer, **kw):
    torch.manual_seed(0)
    m = cls(src_vocab_size=40, tgt_vocab_size=50, d_model=32, num_heads=4, d_ff=64, num_layers=2, max_seq_len=64,
            dropout=0.0, **kw)
    return scaled_init(m)


def test_enhanced_training_forward_is_the_uncached_model():
    model = _enhanced()
    src = torch.randint(3, 40, (2, 9))
    tgt = torch.randint(3, 50, (2, 7))
    logits = model(src, tgt)
    assert logits.shape == (2, 7, 50)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), tgt.reshape(-1))
    loss.backward()
    assert model.decoder.lm_head.weight.grad is not None


def test_enhanced_enable_cache_greedy_equals_uncached():
    model = _enhanced()
    src = torch.randint(3, 40, (3, 9))
    src[0, 6:] = 0  # padding (pad_token_id=0) is masked automatically
    assert model.kv_cache is None
    cache = model.enable_cache(max_seq_len=64)
    assert isinstance(cache, KVCache) and model.kv_cache is cache
    cached = model.generate(src, max_length=40, temperature=0)  # temperature 0 = greedy
    assert cache.is_initialized and cache.get_seq_len() > 0
    naive = model.generate(src, max_length=40, use_cache=False, temperature=0)
    assert torch.equal(cached, naive)
    assert cached.shape[1] <= 40 and bool((cached[:, 0] == 1).all())  # BOS first
    model.clear_cache()
    assert cache.get_seq_len() == 0
    model.disable_cache()
    assert model.kv_cache is None
    assert torch.equal(model.generate(src, max_length=40, do_sample=False), naive)


def test_enhanced_sampling_with_seed_is_reproducible_and_cache_independent():
    model = _enhanced()
    src = torch.randint(3, 40, (2, 9))
    model.enable_cache(64)
    a = model.generate(src, 30, temperature=0.8, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(5))
    b = model.generate(src, 30, use_cache=False, temperature=0.8, top_k=10, top_p=0.9,
                       generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_enhanced_cache_too_small_is_a_clear_error():
    model = _enhanced()
    model.enable_cache(max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len=8"):
        model.generate(torch.randint(3, 40, (1, 5)), max_length=20)


def test_optimized_transformer_has_cache_on_by_default():
    model = _enhanced(OptimizedTransformer)
    assert isinstance(model.kv_cache, KVCache) and model.kv_cache.max_seq_len == 64
    src = torch.randint(3, 40, (1, 6))
    assert torch.equal(model.generate(src, 20, temperature=0), model.generate(src, 20, use_cache=False, temperature=0))


def test_rope_angles_stay_exact_after_casting_the_model_to_bfloat16():
    from transformer.layers import RotaryEmbedding
    rope = RotaryEmbedding(16)
    pos = torch.tensor([[257, 1000, 4097]])
    cos32, sin32 = rope(pos)
    rope.to(torch.bfloat16)  # what model.to(torch.bfloat16) does to the frequency buffer
    cos16, sin16 = rope(pos)
    assert cos16.dtype == torch.float32
    torch.testing.assert_close(cos16, cos32)
    torch.testing.assert_close(sin16, sin32)
