"""The central promise: decoding with a cache changes nothing.

For both models, every cache type and layout, MHA / GQA / MQA, learned and rotary positions,
batch 1 and a ragged batch of 3: the logits of every step match the uncached reference
(fp32, atol 1e-5) and the greedy tokens are identical over 64 steps.  Seeded sampling gives
identical tokens too.  A ragged batch gives each row the tokens of its prompt run alone.
"""

from __future__ import annotations

import functools

import pytest
import torch

from helpers import (ATTN, CACHE_KINDS, left_pad, make_seq2seq_cache, make_test_cache, tiny_decoder,
                     tiny_seq2seq)

STEPS = 64
ATOL = 1e-5


def _prompts(batch, seed=1, vocab=61):
    g = torch.Generator().manual_seed(seed)
    lengths = [5] if batch == 1 else [3, 9, 6]
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


@functools.lru_cache(maxsize=None)
def _decoder(attn, pos):
    return tiny_decoder(attn, pos)


@functools.lru_cache(maxsize=None)
def _reference(attn, pos, batch):
    """Uncached greedy run (the oracle): sequences and per-step logits."""
    ids, mask = left_pad(_prompts(batch))
    return _decoder(attn, pos).generate(ids, STEPS, use_cache=False, attention_mask=mask, output_logits=True)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kind", CACHE_KINDS)
@pytest.mark.parametrize("pos", ["learned", "rope"])
@pytest.mark.parametrize("attn", list(ATTN))
def test_decoder_cached_matches_uncached(attn, pos, kind, batch):
    model = _decoder(attn, pos)
    ids, mask = left_pad(_prompts(batch))
    cache = make_test_cache(kind, model.config, batch, ids.shape[1] + STEPS)
    out = model.generate(ids, STEPS, cache_implementation=cache, attention_mask=mask, output_logits=True)
    ref = _reference(attn, pos, batch)
    assert out.logits.shape == (batch, STEPS, model.config.vocab_size)
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=0)
    assert torch.equal(out.sequences, ref.sequences)


@pytest.mark.parametrize("impl", ["dynamic", "static"])
@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_ragged_batch_equals_each_prompt_alone(impl, pos):
    model = _decoder("gqa", pos)
    prompts = _prompts(3)
    ids, mask = left_pad(prompts)
    batched = model.generate(ids, STEPS, cache_implementation=impl, attention_mask=mask, output_logits=True)
    for row, p in enumerate(prompts):
        alone = model.generate(p[None], STEPS, cache_implementation=impl, output_logits=True)
        assert torch.equal(batched.sequences[row, ids.shape[1]:], alone.sequences[0, len(p):])
        torch.testing.assert_close(batched.logits[row], alone.logits[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_seeded_sampling_identical_with_and_without_cache(kind):
    model = _decoder("gqa", "rope")
    ids, mask = left_pad(_prompts(3))
    runs = []
    for use_cache in (False, True):
        g = torch.Generator().manual_seed(1234)
        runs.append(model.generate(ids, STEPS, use_cache=use_cache, cache_implementation=kind, attention_mask=mask,
                                   do_sample=True, temperature=0.9, top_k=20, top_p=0.95, generator=g))
    assert torch.equal(runs[0], runs[1])
    g = torch.Generator().manual_seed(99)
    other = model.generate(ids, STEPS, attention_mask=mask, do_sample=True, temperature=0.9, generator=g)
    assert not torch.equal(other, runs[1]), "a different seed should give a different sample"


def test_speculative_style_multi_token_step_matches_reference():
    """Feeding several new tokens at once over a non-empty cache (what a verifier does) is exact."""
    model = _decoder("gqa", "rope")
    seq = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(3))
    full = model(seq)
    for kind in ("dynamic-bhsd", "static-bshd"):
        cache = make_test_cache(kind, model.config, 2, 32)
        a = model(seq[:, :7], cache=cache)
        b = model(seq[:, 7:12], cache=cache)
        c = model(seq[:, 12:], cache=cache)
        torch.testing.assert_close(torch.cat([a, b, c], 1), full, atol=ATOL, rtol=0)
        cache.rollback(10)  # roll back and redo: same answer
        torch.testing.assert_close(model(seq[:, 10:], cache=cache), full[:, 10:], atol=ATOL, rtol=0)


def _attention_over(model, ids, first_visible, window=None):
    """The hand-built reference for a cropped cache: the uncached model run over all of ``ids``
    ``(B, T)`` at positions ``0..T-1`` with an explicit mask -- query ``q`` sees key ``k`` iff
    ``first_visible[q] <= k <= q`` (and ``q - k < window``).  Uses the model's own modules
    (embeddings, blocks, head) but none of its cache or mask logic."""
    dec = model.decoder
    T = ids.shape[1]
    pos = torch.arange(T)
    x = dec.tok_emb(ids)
    rope = None
    if dec.pos_emb is not None:
        x = x + dec.pos_emb(pos[None])
    else:
        rope = dec.rotary(pos[None])
    q, k = pos[:, None], pos[None, :]
    allowed = (k <= q) & (k >= first_visible[:, None])
    if window is not None:
        allowed &= q - k < window
    for block in dec.blocks:
        x = block(x, mask=allowed[None, None], rope=rope)
    return dec.lm_head(dec.norm_f(x))


@pytest.mark.parametrize("kind", ["dynamic-bhsd", "static-bshd", "substatic-bhsd", "window"])
@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_decoding_after_crop_attends_exactly_to_the_kept_positions(pos, kind):
    """``cache.crop(n)`` keeps the last ``n`` tokens; decoding continues at the right positions
    and attends to exactly those tokens plus the new ones (one-token steps and a 3-token chunk,
    through two crops), as the explicit-mask reference does; the crop point's prompt logits are
    those of plain causal attention."""
    window = 6 if kind == "window" else None
    model = tiny_decoder("gqa", pos, sliding_window=window) if window else _decoder("gqa", pos)
    seq = torch.randint(0, 61, (2, 22), generator=torch.Generator().manual_seed(4))
    if kind == "window":
        from kv_cache import SlidingWindowKVCache
        cache = SlidingWindowKVCache(window)
    else:
        cache = make_test_cache(kind, model.config, 2, 16)  # 16 slots for 22 positions: crop frees room
    first_visible = torch.zeros(22, dtype=torch.long)
    got = [model(seq[:, :10], cache=cache)]                      # prompt: positions 0..9
    cache.crop(4)                                                # keep positions 6..9
    assert cache.get_seq_length(0) == 10 and not cache.is_lossless
    assert torch.equal(cache.key_positions(0).sort().values, torch.arange(6, 10))
    first_visible[10:] = 6
    for t in range(10, 14):                                      # one token at a time: 10..13
        got.append(model(seq[:, t:t + 1], cache=cache))
    got.append(model(seq[:, 14:17], cache=cache))                # a chunk: 14..16 (DeferredMask path)
    cache.crop(3)                                                # keep positions 14..16
    first_visible[17:] = 14
    for t in range(17, 22):
        got.append(model(seq[:, t:t + 1], cache=cache))
    assert cache.get_seq_length(0) == 22
    want = _attention_over(model, seq, first_visible, window)
    torch.testing.assert_close(torch.cat(got, 1), want, atol=ATOL, rtol=0)
    plain = _attention_over(model, seq, torch.zeros(22, dtype=torch.long), window)
    assert (plain[:, 10:] - want[:, 10:]).abs().max() > 1e-2  # the crop did change what later tokens see
    if kind != "window":
        with pytest.raises(ValueError, match=r"crop\(\) dropped positions 0..13: expected positions >= 14"):
            model(seq[:, 13:14], cache=cache, cache_position=torch.tensor([13]))


def test_explicit_cache_position_1d_matches_append():
    model = _decoder("mha", "learned")
    seq = torch.randint(0, 61, (1, 12), generator=torch.Generator().manual_seed(4))
    full = model(seq)
    cache = make_test_cache("static-bhsd", model.config, 1, 16)
    model(seq[:, :8], cache=cache, cache_position=torch.arange(8))
    out = model(seq[:, 8:], cache=cache, cache_position=torch.arange(8, 12))
    torch.testing.assert_close(out, full[:, 8:], atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- encoder-decoder
def _sources(batch, seed=5, vocab=61):
    g = torch.Generator().manual_seed(seed)
    lengths = [7] if batch == 1 else [4, 10, 7]
    srcs = [torch.randint(3, vocab, (n,), generator=g) for n in lengths]
    n = max(lengths)
    src = torch.zeros(batch, n, dtype=torch.long)
    mask = torch.zeros(batch, n, dtype=torch.long)
    for i, s in enumerate(srcs):  # right padding: the encoder is bidirectional, masks do the rest
        src[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return srcs, src, mask


@functools.lru_cache(maxsize=None)
def _seq2seq(attn, pos):
    return tiny_seq2seq(attn, pos)


@functools.lru_cache(maxsize=None)
def _seq2seq_reference(attn, pos, batch):
    _, src, mask = _sources(batch)
    return _seq2seq(attn, pos).generate(src, STEPS, src_mask=mask, use_cache=False, output_logits=True,
                                        eos_token_id=None)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kind", CACHE_KINDS)
@pytest.mark.parametrize("pos", ["learned", "rope"])
@pytest.mark.parametrize("attn", list(ATTN))
def test_seq2seq_cached_matches_uncached(attn, pos, kind, batch):
    model = _seq2seq(attn, pos)
    _, src, mask = _sources(batch)
    cache = make_seq2seq_cache(kind, model.config, batch, STEPS + 1, src.shape[1])
    out = model.generate(src, STEPS, src_mask=mask, cache_implementation=cache, output_logits=True, eos_token_id=None)
    ref = _seq2seq_reference(attn, pos, batch)
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=0)
    assert torch.equal(out.sequences, ref.sequences)


def test_seq2seq_padded_batch_equals_each_source_alone():
    model = _seq2seq("gqa", "learned")
    srcs, src, mask = _sources(3)
    batched = model.generate(src, STEPS, src_mask=mask, output_logits=True, eos_token_id=None)
    for row, s in enumerate(srcs):
        alone = model.generate(s[None], STEPS, output_logits=True, eos_token_id=None)
        assert torch.equal(batched.sequences[row], alone.sequences[0])
        torch.testing.assert_close(batched.logits[row], alone.logits[0], atol=ATOL, rtol=0)


def _count_cross_projections(model):
    calls = []
    handles = [blk.cross_attn.kv_proj.register_forward_hook(lambda *a: calls.append(1))
               for blk in model.decoder.blocks]
    return calls, handles


@pytest.mark.parametrize("impl", ["dynamic", "static"])
def test_cross_attention_projected_once_per_layer(impl):
    model = _seq2seq("mha", "learned")
    _, src, mask = _sources(3)
    calls, handles = _count_cross_projections(model)
    try:
        model.generate(src, 20, src_mask=mask, cache_implementation=impl, eos_token_id=None)
        assert len(calls) == model.config.n_layers  # once per layer for the whole generation
        calls.clear()
        model.generate(src, 20, src_mask=mask, use_cache=False, eos_token_id=None)
        assert len(calls) == model.config.n_layers * 20  # the reference re-projects every step
    finally:
        for h in handles:
            h.remove()
