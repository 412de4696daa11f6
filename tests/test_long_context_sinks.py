"""``SinkKVCache`` (StreamingLLM): a model decoding through it gives the logits of a naive
reference that keeps *every* token's key/value, picks the kept ones (the first
``num_sink_tokens`` and the last ``window``) and recomputes attention over them with positions
*inside the cache* -- for decoding, long prompts and mixed chunks, MHA/GQA, rotary and learned
positions.  Positions never exceed the cache, however far past the training context."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import tiny_decoder
from kv_cache import DynamicKVCache, SinkKVCache, SlidingWindowKVCache
from transformer.layers import apply_rotary

ATOL = 1e-5


def returned_set(t0: int, S: int, sinks: int, window: int):
    """What the cache hands attention for ``S`` tokens at ``t0``, in time order: the sinks, the
    ``window - 1`` tokens before the chunk (the first new query still sees them), the chunk."""
    return sorted(set(range(min(sinks, t0 + S))) | set(range(max(0, t0 - window + 1), t0)) | set(range(t0, t0 + S)))


@torch.no_grad()
def naive_streaming_logits(model, ids, sinks, window, chunks):
    """StreamingLLM by brute force: all pre-rotation keys/values are kept; for each chunk the
    returned set is renumbered 0..n-1 (keys) and the queries are the last S of it; query ``t``
    sees key ``k <= t`` iff ``k < sinks`` or ``t - k < window``.  Attention is a plain softmax."""
    dec, cfg = model.decoder, model.config
    groups = cfg.n_heads // cfg.n_kv_heads
    history = [([], []) for _ in dec.blocks]
    logits, t0 = [], 0
    for S in chunks:
        x = dec.tok_emb(ids[:, t0:t0 + S])
        if dec.pos_emb is not None:
            x = x + dec.pos_emb(torch.arange(t0, t0 + S))
        kept = torch.tensor(returned_set(t0, S, sinks, window))
        n, q_abs = kept.numel(), torch.arange(t0, t0 + S)[:, None]
        visible = (kept[None] <= q_abs) & ((kept[None] < sinks) | (q_abs - kept[None] < window))
        for l, block in enumerate(dec.blocks):
            q, k, v = block.attn.project_qkv(block.norm1(x))
            history[l][0].append(k)
            history[l][1].append(v)
            K, V = torch.cat(history[l][0], 1)[:, kept], torch.cat(history[l][1], 1)[:, kept]
            if dec.rotary is not None:
                cos, sin = dec.rotary(torch.arange(n)[None])
                K, q = apply_rotary(K, cos, sin), apply_rotary(q, cos[:, n - S:], sin[:, n - S:])
            K, V = K.repeat_interleave(groups, 2), V.repeat_interleave(groups, 2)
            scores = torch.einsum("bshd,bnhd->bhsn", q, K) / math.sqrt(cfg.head_dim)
            p = scores.masked_fill(~visible, float("-inf")).softmax(-1)
            x = x + block.attn.out_proj(torch.einsum("bhsn,bnhd->bshd", p, V).reshape(x.shape[0], S, -1))
            x = x + block.mlp(block.norm2(x))
        logits.append(dec.lm_head(dec.norm_f(x)))
        t0 += S
    return torch.cat(logits, 1)


SCHEDULES = {"decode": [5] + [1] * 45, "long-prompt": [30] + [1] * 20, "mixed": [3, 1, 9, 1, 1, 4, 1, 13] + [1] * 17}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("pos", ["rope", "learned"])
@pytest.mark.parametrize("attn", ["mha", "gqa"])
def test_model_matches_naive_streaming_reference(attn, pos, schedule):
    model = tiny_decoder(attn, pos)
    chunks = SCHEDULES[schedule]
    ids = torch.randint(0, 61, (2, sum(chunks)), generator=torch.Generator().manual_seed(1))
    cache, got, t = SinkKVCache(num_sink_tokens=3, window=6), [], 0
    for S in chunks:
        got.append(model(ids[:, t:t + S], cache=cache))
        t += S
    torch.testing.assert_close(torch.cat(got, 1), naive_streaming_logits(model, ids, 3, 6, chunks), atol=ATOL, rtol=0)


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_a_prompt_that_fits_is_exactly_full_attention(pos):
    model = tiny_decoder("gqa", pos)
    ids = torch.randint(0, 61, (1, 14))
    out = model.generate(ids, 10, cache_implementation=SinkKVCache(4, 20), output_logits=True, eos_token_id=None)
    ref = model.generate(ids, 10, use_cache=False, output_logits=True, eos_token_id=None)
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=0)  # 24 tokens < 4 + 20: nothing evicted


def test_keys_are_rotated_once_and_only_the_sinks_owe_a_rotation():
    model = tiny_decoder("mha", "rope")
    ids = torch.randint(0, 61, (1, 40))
    sink, dyn = SinkKVCache(2, 16), DynamicKVCache()
    for t in range(40):
        model(ids[:, t:t + 1], cache=sink)
    model(ids, cache=dyn)
    assert sink.rotary_offsets(0).tolist() == [22, 22]  # 40 - (2 + 16) tokens dropped: sinks move 22 closer
    kept = sink.key_positions(0)  # ring order
    stored, full = sink.get(0)[0], dyn.get(0)[0]  # get(): the sinks as handed over, rotated at 0 and 1
    torch.testing.assert_close(stored, full[:, :, kept], atol=1e-6, rtol=0)  # every key: its own rotation, once


@torch.no_grad()
def old_rerotating_attention(q_raw, k_raw, v, kept, visible):
    """The definition before #18, one layer: keys cached *unrotated*; every step each returned key
    is rotated at its rank among the returned keys and the ``S`` queries at the last ``S`` ranks."""
    from transformer.layers import RotaryEmbedding
    n, S = kept.numel(), q_raw.shape[1]
    cos, sin = RotaryEmbedding(q_raw.shape[-1])(torch.arange(n)[None])
    K = apply_rotary(k_raw[:, kept], cos, sin)
    Q = apply_rotary(q_raw, cos[:, n - S:], sin[:, n - S:])
    scores = torch.einsum("bshd,bnhd->bhsn", Q, K) / math.sqrt(q_raw.shape[-1])
    return torch.einsum("bhsn,bnhd->bshd", scores.masked_fill(~visible, float("-inf")).softmax(-1), v[:, kept])


@pytest.mark.parametrize("chunks", [[7] + [1] * 400, [3, 1, 50, 1, 1, 9] + [1] * 120 + [33] + [1] * 60])
def test_one_layer_equals_the_old_rerotate_everything_definition(chunks):
    """The model's attention path (keys rotated at absolute positions before ``update``, sinks
    rotated by ``rotary_offsets`` in place, queries at their absolute positions) against the
    old definition, step by step, far past the cache size."""
    from transformer.attention import _rotate_front
    from transformer.layers import RotaryEmbedding
    sinks, window, H, D = 4, 24, 3, 16
    g = torch.Generator().manual_seed(0)
    T = sum(chunks)
    q_raw, k_raw, v = (torch.randn(1, T, H, D, generator=g) for _ in range(3))
    rotary, cache, t0 = RotaryEmbedding(D), SinkKVCache(sinks, window), 0
    for S in chunks:
        cos, sin = rotary(torch.arange(t0, t0 + S)[None])
        q, k = apply_rotary(q_raw[:, t0:t0 + S], cos, sin), apply_rotary(k_raw[:, t0:t0 + S], cos, sin)
        keys, values = cache.update(k.transpose(1, 2), v[:, t0:t0 + S].transpose(1, 2), 0)
        owed = cache.rotary_offsets(0)
        if owed is not None:
            _rotate_front(keys, owed, rotary)
        pos = cache.key_positions(0)
        qpos = torch.arange(t0, t0 + S)
        allowed = (pos[None] <= qpos[:, None]) & cache.retention_mask(qpos, pos)
        got = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), keys, values,
                                                               attn_mask=allowed).transpose(1, 2)
        kept = torch.tensor(returned_set(t0, S, sinks, window))
        order = torch.argsort(pos)  # the cache returns ring order; the old definition time order
        assert torch.equal(pos[order], kept)
        q_abs = qpos[:, None]
        visible = (kept[None] <= q_abs) & ((kept[None] < sinks) | (q_abs - kept[None] < window))
        want = old_rerotating_attention(q_raw[:, t0:t0 + S], k_raw[:, :t0 + S], v[:, :t0 + S], kept, visible)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
        t0 += S
    assert t0 > 8 * (sinks + window)  # the sinks really moved: far more tokens than the cache holds


def test_generate_equals_the_naive_streaming_reference_far_past_the_cache():
    model = tiny_decoder("gqa", "rope")
    prompt = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(3))
    out = model.generate(prompt, 120, cache_implementation=SinkKVCache(3, 10), output_logits=True,
                         eos_token_id=None)
    ref = naive_streaming_logits(model, out.sequences, 3, 10, [9] + [1] * 119)
    torch.testing.assert_close(out.logits, ref[:, 8:], atol=ATOL, rtol=0)


def test_generation_far_past_the_context_keeps_positions_inside_the_cache():
    model = tiny_decoder("gqa", "rope", max_seq_len=24)
    cache = model.new_cache("sinks")  # defaults: 4 sinks + a window of max_seq_len - 4
    assert (cache.num_sink_tokens, cache.window) == (4, 20)
    out = model.generate(torch.randint(0, 61, (1, 8)), 150, cache_implementation=cache, output_logits=True,
                         eos_token_id=None)
    assert out.sequences.shape == (1, 158) and torch.isfinite(out.logits).all()
    ranks = cache.key_positions(0, in_cache=True)
    assert sorted(ranks.tolist()) == list(range(24))  # positions 0..23, never 157
    assert cache.stored_positions(0).tolist() == [0, 1, 2, 3] + list(range(137, 157))
    # fixed: 2 layers x (keys + values + positions + the 4 sink keys as handed over)
    assert cache.memory_bytes() == 2 * 2 * (2 * 24 * 8 * 4) + 2 * 24 * 8 + 2 * (2 * 4 * 8 * 4)


def test_zero_sinks_is_a_plain_window_because_rope_is_relative():
    model = tiny_decoder("mha", "rope")
    ids = torch.randint(0, 61, (1, 40))
    a, b, t = SinkKVCache(0, 10), SlidingWindowKVCache(10), 0
    for S in [4] + [1] * 36:  # zero sinks + in-cache positions == a window at absolute positions (RoPE is relative)
        torch.testing.assert_close(model(ids[:, t:t + S], cache=a), model(ids[:, t:t + S], cache=b), atol=1e-4, rtol=0)
        t += S


@pytest.mark.parametrize("args, match", [
    ((-1, 4), "num_sink_tokens must be a non-negative int, got -1"), ((1.5, 4), "num_sink_tokens"),
    ((2, 0), "window must be a positive int, got 0"), ((2, None), "window"),
])
def test_invalid_sink_counts_and_windows(args, match):
    with pytest.raises(ValueError, match=match):
        SinkKVCache(*args)


def test_generate_options_and_errors():
    model = tiny_decoder("mha", "rope")
    c = model.new_cache("sinks", num_sink_tokens=2, window=9)
    assert isinstance(c, SinkKVCache) and c.get_max_cache_shape() == 11
    with pytest.raises(ValueError, match="num_sink_tokens must be a non-negative int"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 2, cache_implementation="sinks",
                       cache_config={"num_sink_tokens": -2})
    with pytest.raises(ValueError, match=r"\['nbits'\].*accepts \['num_sink_tokens', 'window'\]"):
        model.new_cache("sinks", nbits=4)
