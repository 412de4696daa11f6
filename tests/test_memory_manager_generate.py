"""Models generate through the paged pool (``kv_cache.PagedCacheView``) exactly as with a plain cache.

The oracle is each prompt decoded alone with ``DynamicKVCache``; the pool decodes ragged
prompts together (left padded, one block table per row) and must give the same greedy tokens
and logits within 1e-5.  Prefix reuse must give the logits of a full prefill.
"""

import pytest
import torch

from helpers import left_pad, tiny_decoder
from kv_cache import (
    AdvancedKVCache, CacheConfig, DynamicKVCache, EvictedSequenceError, PagedCacheView, PoolExhaustedError,
)
from transformer import generate


def manager_for(model, blocks_mb=1.0, block_size=4, policy="lru", **kw):
    c = model.config
    return AdvancedKVCache(CacheConfig(
        max_batch_size=8, max_sequence_length=c.max_seq_len, embed_dim=c.d_model, num_heads=c.n_heads,
        num_kv_heads=c.n_kv_heads, num_layers=c.n_layers, block_size=block_size, memory_limit_mb=blocks_mb,
        eviction_policy=policy, **kw))


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 61, (n,), generator=g) for n in lengths]


@pytest.mark.parametrize("attn, pos, layout", [("mha", "learned", "bhsd"), ("gqa", "rope", "bshd")])
def test_ragged_prompts_decoded_together_from_one_pool_match_each_alone(attn, pos, layout):
    model = tiny_decoder(attn, pos)
    manager = manager_for(model)
    manager.set_cache(0, "someone else", *(torch.randn(2, 9, model.config.n_kv_heads, model.config.head_dim)))
    prompts = prompts_of([3, 13, 8])
    ids, mask = left_pad(prompts)
    with PagedCacheView(manager, ["a", "b", "c"], layout=layout) as view:
        out = generate(model, ids, 32, cache_implementation=view, attention_mask=mask, eos_token_id=None,
                       output_logits=True)
        assert view.get_seq_length() == ids.shape[1] + 31
    for i, p in enumerate(prompts):
        ref = generate(model, p[None], 32, cache_implementation=DynamicKVCache(), eos_token_id=None,
                       output_logits=True)
        assert torch.equal(out.sequences[i, ids.shape[1]:], ref.sequences[0, len(p):]), f"row {i} tokens differ"
        torch.testing.assert_close(out.logits[i], ref.logits[0], atol=1e-5, rtol=1e-5)
    assert manager.sequence_length("someone else", 0) == 9  # the other tenant is untouched
    manager.check_invariants()
    stats = manager.get_global_stats()
    assert stats["memory_pool"]["used_blocks"] == 3 * -(-(ids.shape[1] + 31) // 4) + 3


def test_prefix_reuse_skips_the_shared_prefill_and_gives_the_same_logits():
    model = tiny_decoder("gqa", "rope")
    manager = manager_for(model)
    system = prompts_of([12], seed=1)[0]
    first = torch.cat([system, torch.tensor([5, 6, 7])])
    second = torch.cat([system, torch.tensor([9, 3])])
    with torch.no_grad():
        manager.add_sequence("first", first.tolist())
        with PagedCacheView(manager, ["first"]) as view:
            model(first[None], cache=view)
        reused = manager.add_sequence("second", second.tolist())
        assert reused == 12  # three full blocks of 4 tokens: only 2 tokens left to prefill
        with PagedCacheView(manager, ["second"]) as view:
            assert view.get_seq_length() == 12
            logits = model(second[None, reused:], cache=view)[:, -1]
            steps = [logits]
            for _ in range(5):  # and decoding continues correctly on top of the shared blocks
                token = steps[-1].argmax(-1, keepdim=True)
                steps.append(model(token, cache=view)[:, -1])
    ref = generate(model, second[None], 6, cache_implementation=DynamicKVCache(), eos_token_id=None,
                   output_logits=True)
    torch.testing.assert_close(torch.stack(steps, 1)[0], ref.logits[0], atol=1e-5, rtol=1e-5)
    assert manager.block_table("second")[:3] == manager.block_table("first")[:3]
    assert manager.get_global_stats()["prefix_cache"]["hit_tokens"] == 12


def _kv(batch, n, fill):
    t = torch.arange(n, dtype=torch.float32).view(1, 1, n, 1) + 100 * torch.arange(batch).view(batch, 1, 1, 1) + fill
    return t.expand(batch, 2, n, 4).clone()


def test_view_implements_the_cache_api_with_forks():
    manager = AdvancedKVCache(CacheConfig(max_batch_size=8, max_sequence_length=32, embed_dim=8, num_heads=2,
                                          num_layers=1, block_size=4, memory_limit_mb=1))
    view = PagedCacheView(manager, ["x", "y"])
    assert view.get(0) is None
    k, v = view.update(_kv(2, 6, 0), -_kv(2, 6, 0), 0)
    assert k.shape == (2, 2, 6, 4) and torch.equal(k, _kv(2, 6, 0)) and torch.equal(v, -_kv(2, 6, 0))
    used = manager.pool.num_used
    view.batch_repeat_interleave(2)  # beam expansion: forks, no copy
    assert len(view.sequence_ids) == 4 and manager.pool.num_used == used
    assert view.memory_bytes() == used * manager.pool.block_bytes
    k, _ = view.update(_kv(4, 1, 50), _kv(4, 1, 50), 0)  # rows diverge: copy on write of the last blocks
    assert torch.equal(k[:, :, :6], _kv(2, 6, 0).repeat_interleave(2, 0)) and torch.equal(k[:, :, 6:], _kv(4, 1, 50))
    assert manager.get_global_stats()["memory_pool"]["cow_copies"] == 2
    view.batch_select_indices([3, 0])  # the two dropped rows are freed
    assert len(manager) == 2 and torch.equal(view.get(0)[0][:, :, 6:], _kv(4, 1, 50)[[3, 0]])
    view.rollback(-2)
    assert view.get_seq_length() == 5 and len(view) == 5
    with pytest.raises(ValueError, match="only appends"):
        view.update(_kv(2, 1, 0), _kv(2, 1, 0), 0, cache_position=torch.tensor(2))
    view.update(_kv(2, 1, 0), _kv(2, 1, 0), 0, cache_position=torch.tensor([5]))
    with pytest.raises(ValueError, match="batch size 3, but this view has 2 rows"):
        view.update(_kv(3, 1, 0), _kv(3, 1, 0), 0)
    with pytest.raises(IndexError, match="layer_idx=1 is out of range"):
        view.get_seq_length(1)
    view.reset()
    assert view.get_seq_length() == 0 and view.get_max_cache_shape() == 32
    view.close(free=True)
    assert len(manager) == 0
    with pytest.raises(RuntimeError, match="closed"):
        view.get(0)


def test_pinned_rows_are_never_evicted_and_a_full_pool_of_them_raises():
    manager = AdvancedKVCache(CacheConfig(max_batch_size=8, max_sequence_length=64, embed_dim=8, num_heads=2,
                                          num_layers=1, block_size=4, memory_limit_mb=6 * 4 * 2 * 8 * 4 / 2 ** 20))
    manager.append_cache(0, "idle", torch.zeros(8, 2, 4), torch.zeros(8, 2, 4))  # 2 blocks, unpinned
    view = PagedCacheView(manager, ["p", "q"])
    view.update(_kv(2, 8, 0), _kv(2, 8, 0), 0)  # 4 blocks: the pool (6) is now full
    view.update(_kv(2, 1, 0), _kv(2, 1, 0), 0)  # needs 2 more: "idle" is evicted, not a pinned row
    assert "idle" not in manager and manager.sequence_length("p") == 9
    with pytest.raises(PoolExhaustedError, match="pinned"):
        view.update(_kv(2, 4, 0), _kv(2, 4, 0), 0)
    assert manager.sequence_length("p") == manager.sequence_length("q") == 9  # nothing half-written
    view.close()
    manager.append_cache(0, "new", torch.zeros(8, 2, 4), torch.zeros(8, 2, 4))  # unpinned rows can go now
    assert "p" not in manager


def test_view_refuses_what_it_cannot_serve():
    manager = AdvancedKVCache(CacheConfig(max_batch_size=4, max_sequence_length=64, embed_dim=8, num_heads=2,
                                          num_layers=1, block_size=4, eviction_policy="sliding_window",
                                          sliding_window_size=4, memory_limit_mb=3 * 4 * 2 * 8 * 4 / 2 ** 20))
    manager.append_cache(0, "long", torch.zeros(12, 2, 4), torch.zeros(12, 2, 4))
    manager.append_cache(0, "long", torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))  # the window drops old blocks
    with pytest.raises(ValueError, match="lost its first tokens to the sliding window"):
        PagedCacheView(manager, ["long"])
    with pytest.raises(ValueError, match="repeat an id"):
        PagedCacheView(manager, ["a", "a"])
    with pytest.raises(TypeError, match="manager must be an AdvancedKVCache"):
        PagedCacheView({}, ["a"])
    manager.append_cache(0, "short", torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))
    manager.add_sequence("empty")
    with pytest.raises(ValueError, match="different lengths"):
        PagedCacheView(manager, ["short", "empty"]).get_seq_length()


def test_continuing_an_evicted_sequence_raises_instead_of_decoding_without_its_context():
    """Issue #14 item 4.  A request decoded through a view, paused (view closed, so unpinned), then
    evicted by another request.  Continuing it used to re-add it as a new, empty sequence: the
    model decoded the next token at position 0 with no context (logits off by up to 4.8 here,
    no error).  Now the view refuses the evicted id, naming it, and a deliberate re-prefill
    gives the logits of the uncached model."""
    model = tiny_decoder("mha", "learned")
    c = model.config
    block_bytes = 4 * 2 * c.n_layers * c.n_kv_heads * c.head_dim * 4
    manager = manager_for(model, blocks_mb=4 * block_bytes / 2 ** 20)  # 4 blocks of 4 tokens
    a, b = prompts_of([8, 12], seed=3)
    a_next = torch.cat([a, torch.tensor([7])])
    with torch.no_grad():
        with PagedCacheView(manager, ["a"]) as view:
            model(a[None], cache=view)  # 2 blocks
        with PagedCacheView(manager, ["b"]) as view:
            model(b[None], cache=view)  # 3 blocks: "a" (paused, unpinned) is evicted
        assert "a" not in manager and manager.was_evicted("a")
        with pytest.raises(EvictedSequenceError, match="sequence_id='a' was evicted.*Re-prefill it"):
            PagedCacheView(manager, ["a"])
        with pytest.raises(EvictedSequenceError):
            PagedCacheView(manager, ["b", "a"])  # refused before any row is added or pinned
        assert "a" not in manager and not manager.sequence_info("b")["pinned"]
        assert manager.clear_sequence("a") is False  # acknowledge the loss, then re-prefill it
        with PagedCacheView(manager, ["a"]) as view:
            got = model(a_next[None], cache=view)[0, -1]
        ref = model(a_next[None])[0, -1]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    manager.check_invariants()
