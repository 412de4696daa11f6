"""The paged KV memory manager (``kv_cache.AdvancedKVCache`` and friends), one behaviour per test.

Random workloads over all of this live in ``test_memory_manager_properties.py``; generation
through the pool in ``test_memory_manager_generate.py``.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kv_cache import (
    AdvancedKVCache, CacheCapacityError, CacheConfig, CachedAttentionMixin, CachePerformanceMonitor,
    EvictedSequenceError, EvictionPolicy, PoolExhaustedError, UnknownSequenceError,
    create_cache_config_for_speculative_decoding,
)

H, D, BS = 2, 4, 4  # kv heads, head dim, block size of the small configs below
BYTES_PER_BLOCK = BS * 2 * 2 * H * D * 4  # tokens x (k, v) x 2 layers x heads x dim x fp32 = 512


def make(policy="lru", blocks=8, **kw):
    """A 2-layer manager whose budget is exactly ``blocks`` blocks of 4 tokens."""
    base = dict(max_batch_size=16, max_sequence_length=64, embed_dim=H * D, num_heads=H, num_layers=2,
                eviction_policy=policy, memory_limit_mb=blocks * BYTES_PER_BLOCK / 2 ** 20, block_size=BS)
    base.update(kw)
    return AdvancedKVCache(CacheConfig(**base))


def kv(n, fill):
    """``n`` tokens whose keys/values are all ``fill`` (+ token index), so reads are checkable."""
    t = torch.arange(n, dtype=torch.float32)[:, None, None] + fill
    return t.expand(n, H, D).clone(), -t.expand(n, H, D).clone()


def write(cache, sid, n, fill=0.0, layers=(0, 1)):
    """Append ``n`` tokens to each of ``layers`` of ``sid``."""
    for l in layers:
        cache.append_cache(l, sid, *kv(n, fill))


# ---------------------------------------------------------------------------------- config
def test_config_derives_sizes_and_accepts_the_reference_presets():
    cfg = CacheConfig(max_batch_size=4, max_sequence_length=512, embed_dim=256, num_heads=8, num_layers=12,
                      eviction_policy=EvictionPolicy.LRU, memory_limit_mb=64, preallocate_memory=False,
                      use_memory_pool=True)
    assert cfg.head_dim == 32 and cfg.num_kv_heads == 8
    assert cfg.bytes_per_token == 2 * 12 * 8 * 32 * 4 and cfg.max_blocks == 64 * 2 ** 20 // (16 * cfg.bytes_per_token)
    llm = CacheConfig(max_batch_size=64, max_sequence_length=4096, embed_dim=4096, num_heads=32, num_layers=48,
                      eviction_policy=EvictionPolicy.ADAPTIVE, memory_limit_mb=2048, preallocate_memory=True)
    research = CacheConfig(max_batch_size=16, max_sequence_length=1024, embed_dim=512, num_heads=16, num_layers=24,
                           eviction_policy="none", memory_limit_mb=512, preallocate_memory=True, use_memory_pool=False)
    assert llm.eviction_policy is EvictionPolicy.ADAPTIVE and research.eviction_policy is EvictionPolicy.NONE
    gqa = CacheConfig(max_batch_size=1, max_sequence_length=8, embed_dim=64, num_heads=8, num_kv_heads=2, num_layers=1)
    assert gqa.bytes_per_token == 2 * 1 * 2 * 8 * 4


@pytest.mark.parametrize("change, match", [
    (dict(max_batch_size=0), "max_batch_size must be a positive int, got 0"),
    (dict(num_layers=2.0), "num_layers must be a positive int, got 2.0"),
    (dict(embed_dim=10, num_heads=4), "embed_dim=10 must be divisible by num_heads=4"),
    (dict(num_kv_heads=3), "num_heads=4 must be a multiple of num_kv_heads=3"),
    (dict(eviction_policy="fifo"), "eviction_policy='fifo' is not known"),
    (dict(max_remembered_ids=0), "max_remembered_ids must be a positive int, got 0"),
    (dict(sliding_window_size=0), "sliding_window_size must be a positive int, got 0"),
    (dict(memory_limit_mb=-1), "memory_limit_mb must be a positive number of MiB, got -1"),
    (dict(memory_limit_mb=1e-6), "smaller than one block"),
    (dict(use_memory_pool=False, memory_limit_mb=0.01, max_sequence_length=4096), "not even one sequence fits"),
    (dict(preallocate_memory="yes"), "preallocate_memory must be a bool"),
    (dict(dtype="float16"), "dtype must be a torch.dtype"),
    (dict(device="warp-drive"), "device='warp-drive'"),
])
def test_invalid_configs_name_the_field_the_value_and_the_expectation(change, match):
    base = dict(max_batch_size=2, max_sequence_length=64, embed_dim=16, num_heads=4, num_layers=1, memory_limit_mb=1)
    base.update(change)
    with pytest.raises((ValueError, TypeError), match=match.replace("(", r"\(").replace(")", r"\)")):
        CacheConfig(**base)


def test_sliding_window_without_a_size_keeps_max_sequence_length_tokens_so_trims_nothing():
    """The reference guide builds ``SLIDING_WINDOW`` configs without ``sliding_window_size``:
    the window is then ``max_sequence_length``, which no sequence can outgrow, so a full pool
    evicts whole least recently used sequences and no sequence loses its first tokens."""
    cfg = CacheConfig(max_batch_size=2, max_sequence_length=64, embed_dim=16, num_heads=4, num_layers=1,
                      eviction_policy=EvictionPolicy.SLIDING_WINDOW, memory_limit_mb=1)
    assert cfg.sliding_window_size is None and cfg.window_tokens == 64
    cfg.sliding_window_size = 8
    assert cfg.window_tokens == 8
    cache = make("sliding_window", blocks=4)
    write(cache, "a", 12)
    write(cache, "b", 4)
    cache.get_cache(0, "a")  # "b" is now the least recently used
    write(cache, "a", 4)  # needs a 5th block: nothing is outside a 64-token window, so "b" goes
    assert cache.sequence_ids == ["a"] and cache.sequence_info("a")["start"] == 0
    assert torch.equal(cache.get_cache(0, "a", 16)[0], torch.cat([kv(12, 0)[0], kv(4, 0)[0]]))


def test_speculative_decoding_configs():
    draft, target = create_cache_config_for_speculative_decoding()
    assert draft.eviction_policy is EvictionPolicy.SLIDING_WINDOW and draft.sliding_window_size == 256
    assert target.eviction_policy is EvictionPolicy.NONE
    assert draft.num_layers < target.num_layers and draft.embed_dim < target.embed_dim
    assert draft.memory_limit_mb + target.memory_limit_mb == pytest.approx(512)
    assert (draft.block_size, draft.max_sequence_length) == (target.block_size, target.max_sequence_length)
    d, t = create_cache_config_for_speculative_decoding(draft_num_layers=1, target_num_layers=2, memory_limit_mb=8,
                                                       draft_memory_fraction=0.5)
    assert d.memory_limit_mb == t.memory_limit_mb == 4
    assert AdvancedKVCache(d) and not len(AdvancedKVCache(t))  # an empty manager is still truthy
    with pytest.raises(ValueError, match="draft_memory_fraction must be in"):
        create_cache_config_for_speculative_decoding(draft_memory_fraction=1.0)


# ---------------------------------------------------------------------------------- basic API
def test_append_cache_appends_and_get_returns_at_most_seq_len_of_what_was_stored():
    cache = make()
    write(cache, "a", 3, fill=10)
    assert cache.append_cache(0, "a", *kv(4, 20)) == 7
    k, v = cache.get_cache(0, "a")
    want_k = torch.cat([kv(3, 10)[0], kv(4, 20)[0]])
    assert torch.equal(k, want_k) and torch.equal(v, -want_k)
    assert torch.equal(cache.get_cache(0, "a", 2)[0], want_k[:2])
    assert torch.equal(cache.get_cache(0, "a", 8)[0], want_k)  # longer than stored: at most seq_len tokens
    assert cache.get_cache(0, "nobody", 8) is None
    assert cache.sequence_length("a", 0) == 7 and cache.sequence_length("a", 1) == 3
    assert cache.block_table("a")[:2] == [0, 1]
    with pytest.raises(ValueError, match="seq_len must be None or a positive int, got 0"):
        cache.get_cache(0, "a", 0)


def test_set_cache_replaces_the_layers_keys_and_values_with_exactly_what_it_is_given():
    """The reference guide's contract: its attention stores a sequence's *whole* K/V at every
    step, so ``set_cache`` replaces (a second call with 5 tokens leaves 5 tokens, not 8)."""
    cache = make(blocks=16)
    assert cache.set_cache(0, "a", *kv(3, 10)) == 3
    assert cache.set_cache(0, "a", *kv(5, 20)) == 5
    k, v = cache.get_cache(0, "a", 5)
    assert torch.equal(k, kv(5, 20)[0]) and torch.equal(v, kv(5, 20)[1])
    assert cache.sequence_length("a", 0) == 5 and cache.sequence_length("a", 1) == 0  # other layers untouched
    flat = make()
    flat.set_cache(0, "f", torch.ones(5, H * D), torch.zeros(5, H * D))  # (T, embed_dim) as in the reference guide
    assert flat.get_cache(0, "f")[0].shape == (5, H * D)
    with pytest.raises(CacheCapacityError, match=r"length 0 \+ 65 new tokens = 65 exceeds max_sequence_length=64"):
        cache.set_cache(0, "b", *kv(65, 0))
    assert "b" not in cache  # refused before anything was added


def test_set_cache_reuses_the_sequences_blocks_and_returns_the_ones_no_layer_needs():
    cache = make(blocks=8)
    for layer in (0, 1):
        cache.set_cache(layer, "a", *kv(16, 0))  # 4 blocks, shared by both layers
    table = cache.block_table("a")
    for _ in range(20):  # storing the whole K/V again and again must not take new blocks
        for layer in (0, 1):
            cache.set_cache(layer, "a", *kv(16, 1))
    assert cache.block_table("a") == table and cache.pool.num_used == 4
    cache.set_cache(0, "a", *kv(5, 2))  # layer 1 still holds 16 tokens: every block stays
    assert cache.block_table("a") == table
    cache.set_cache(1, "a", *kv(6, 3))  # now no layer needs tokens 8..15: 2 blocks go back
    assert cache.block_table("a") == table[:2] and cache.pool.num_used == 2
    assert torch.equal(cache.get_cache(0, "a")[0], kv(5, 2)[0]) and torch.equal(cache.get_cache(1, "a")[0], kv(6, 3)[0])
    cache.check_invariants()
    cache.fork_sequence("a", "b")  # a shared block is copied before it is replaced
    cache.set_cache(0, "b", *kv(3, 9))
    assert cache.block_table("b")[0] != cache.block_table("a")[0]
    assert torch.equal(cache.get_cache(0, "a")[0], kv(5, 2)[0]) and torch.equal(cache.get_cache(0, "b")[0], kv(3, 9)[0])
    cache.check_invariants()


def test_set_cache_keys_are_never_offered_to_a_prefix_match():
    """``set_cache`` cannot tell which tokens its keys belong to, so the sequence leaves the index."""
    cache = make(blocks=16)
    cache.add_sequence("a", list(range(8)))
    write(cache, "a", 8)
    assert cache.match_prefix(list(range(8))) == 8
    cache.set_cache(0, "a", *kv(8, 50))  # other keys over the same positions
    assert cache.match_prefix(list(range(8))) == 0
    cache.append_token_ids("a", [8, 9, 10, 11])
    write(cache, "a", 4)
    assert cache.match_prefix(list(range(12))) == 0
    cache.check_invariants()


def test_set_cache_after_the_window_dropped_blocks_restarts_the_sequence():
    cache = make("sliding_window", blocks=4, sliding_window_size=4)
    write(cache, "a", 16)
    write(cache, "a", 1)  # the window drops the first blocks
    assert cache.sequence_info("a")["start"] > 0
    cache.set_cache(0, "a", *kv(6, 7))  # the whole K/V from token 0: the other layer is emptied
    assert cache.sequence_info("a")["start"] == 0 and cache.sequence_length("a", 1) == 0
    assert torch.equal(cache.get_cache(0, "a", 6)[0], kv(6, 7)[0]) and cache.get_cache(1, "a") is None
    cache.check_invariants()


def test_misses_for_unknown_cleared_and_evicted_ids_and_errors_for_never_seen_ones():
    cache = make()
    assert cache.get_cache(0, "nobody") is None
    write(cache, "a", 2)
    assert cache.clear_sequence("a") is True and cache.get_cache(0, "a") is None
    assert cache.clear_sequence("a") is False
    with pytest.raises(UnknownSequenceError, match="sequence_id='ghost' is not held by this cache .it was never added"):
        cache.clear_sequence("ghost")
    with pytest.raises(UnknownSequenceError, match="sequence_id='a' is not held by this cache .it was cleared"):
        cache.fork_sequence("a", "b")
    with pytest.raises(KeyError):
        cache.sequence_length("ghost")
    with pytest.raises(IndexError, match="layer_id=2 is out of range: this cache has num_layers=2"):
        cache.get_cache(2, "a")
    with pytest.raises(ValueError, match=r"key has shape \(3, 3, 4\), expected"):
        cache.set_cache(0, "a", torch.zeros(3, 3, D), torch.zeros(3, 3, D))
    with pytest.raises(ValueError, match="dtype torch.float16, expected the cache's dtype torch.float32"):
        cache.set_cache(0, "a", torch.zeros(3, H, D, dtype=torch.float16), torch.zeros(3, H, D, dtype=torch.float16))
    with pytest.raises(CacheCapacityError, match="exceeds max_sequence_length=64"):
        cache.append_cache(0, "long", *kv(65, 0))
    assert "long" not in cache  # refused before the id was added
    write(cache, "b", 1)
    with pytest.raises(ValueError, match="already exists"):
        cache.add_sequence("b")


def test_clear_all_and_blocks_are_reused_after_a_clear():
    cache = make(blocks=4)
    write(cache, "a", 8)  # 2 blocks
    first = cache.block_table("a")
    cache.clear_sequence("a")
    write(cache, "b", 8)
    assert sorted(cache.block_table("b")) == sorted(first)  # recycled, not new memory
    assert cache.get_global_stats()["memory_pool"]["pool_hit_rate"] == 0.5  # 2 of 4 allocations recycled
    cache.clear_all()
    assert len(cache) == 0 and cache.pool.num_used == 0 and cache.get_cache(0, "b") is None


def test_preallocation_reserves_the_whole_budget_and_growth_never_passes_it():
    pre = make(blocks=8, preallocate_memory=True)
    assert pre.memory_bytes() == 8 * BYTES_PER_BLOCK
    lazy = make(blocks=20)
    assert lazy.memory_bytes() == 8 * BYTES_PER_BLOCK  # starts with 8 blocks
    for i in range(5):
        write(lazy, i, 16)  # 4 blocks each: 20 in all
    assert lazy.memory_bytes() == 20 * BYTES_PER_BLOCK == lazy.config.max_blocks * lazy.pool.block_bytes
    assert lazy.get_global_stats()["memory_pool"]["grows"] == 2  # 8 -> 16 -> 20 (capped)


# ---------------------------------------------------------------------------------- eviction
def test_none_policy_raises_and_changes_nothing():
    cache = make("none", blocks=4)
    write(cache, "a", 16)
    with pytest.raises(PoolExhaustedError, match="needs 1 free block.* eviction_policy=NONE never evicts"):
        cache.append_cache(0, "b", *kv(1, 0))
    assert cache.sequence_length("a") == 16 and cache.sequence_length("b") == 0 and cache.pool.num_used == 4


def test_lru_evicts_the_least_recently_used_whole_sequence():
    cache = make("lru", blocks=6)
    for sid in "abc":
        write(cache, sid, 8)  # 2 blocks each: full
    cache.get_cache(0, "a")  # "a" is now the most recently used; "b" the least
    write(cache, "d", 4)
    assert cache.sequence_ids == ["a", "c", "d"] and cache.get_cache(0, "b") is None
    assert list(cache.eviction_log) == [("sequence", "b", 2)]
    stats = cache.get_global_stats()
    assert stats["total_evictions"] == stats["sequences_evicted"] == 1
    assert cache.pool.num_used == 5 and cache.memory_bytes() <= cache.config.memory_limit_mb * 2 ** 20


def test_max_batch_size_evicts_a_sequence_or_raises_under_none():
    cache = make("lru", max_batch_size=2)
    write(cache, "a", 1)
    write(cache, "b", 1)
    write(cache, "c", 1)
    assert cache.sequence_ids == ["b", "c"]
    strict = make("none", max_batch_size=1)
    write(strict, "a", 1)
    with pytest.raises(CacheCapacityError, match="max_batch_size=1"):
        strict.add_sequence("b")


def test_sliding_window_drops_old_blocks_and_keeps_the_window():
    cache = make("sliding_window", blocks=4, sliding_window_size=5)
    write(cache, "a", 16)  # 4 blocks: the pool is full
    write(cache, "a", 1, fill=100)  # token 16 needs a 5th block: the window is tokens 11..15, so
    # the blocks holding only tokens 0..7 go (block 2 still holds token 11)
    assert cache.block_table("a")[:3] == [None, None, 2] and len(cache.block_table("a")) == 5
    assert cache.sequence_info("a")["start"] == 8 and cache.get_global_stats()["blocks_trimmed"] == 2
    k, _ = cache.get_cache(0, "a")  # the newest tokens: 8..16
    assert torch.equal(k, torch.cat([kv(16, 0)[0][8:], kv(1, 100)[0]]))
    assert cache.get_cache(1, "a")[0].shape[0] == 9
    assert cache.get_cache(0, "a", 4) is None  # tokens 0..3 are gone
    with pytest.raises(ValueError, match="dropped by the sliding window"):
        cache.crop_sequence("a", 5)


def test_sliding_window_falls_back_to_lru_when_every_sequence_is_inside_its_window():
    cache = make("sliding_window", blocks=4, sliding_window_size=64)
    write(cache, "a", 8)
    write(cache, "b", 8)
    write(cache, "c", 4)
    assert cache.sequence_ids == ["b", "c"]


def test_adaptive_evicts_the_sequence_with_fewest_reads_per_block_not_the_oldest():
    """ADAPTIVE's score is read hits / blocks held; LRU would have evicted "hot" (the oldest)."""
    cache = make("adaptive", blocks=6)
    write(cache, "hot", 4)  # 1 block, read 3 times
    write(cache, "big", 12)  # 3 blocks, read once
    write(cache, "new", 4)  # 1 block, never read
    for _ in range(3):
        cache.get_cache(0, "hot")
    cache.get_cache(0, "big")
    write(cache, "x", 8)  # needs 2 blocks, 1 free: "new" goes (score 0), then "big" (1/3 < 3/1)
    assert [e[1] for e in cache.eviction_log] == ["new"]
    cache.get_cache(0, "x")  # x: 1 read / 2 blocks = 0.5 > big's 1/3
    write(cache, "y", 8)
    assert [e[1] for e in cache.eviction_log] == ["new", "big"]
    assert "hot" in cache


def test_the_policy_can_be_changed_on_a_live_cache_as_the_reference_guide_does():
    cache = make("none", blocks=2)
    write(cache, "a", 8)
    with pytest.raises(PoolExhaustedError):
        write(cache, "b", 1)
    cache.config.eviction_policy = EvictionPolicy.LRU  # takes effect at the next decision
    write(cache, "b", 1)
    assert cache.sequence_ids == ["b"] and cache.get_global_stats()["eviction_policy"] == "lru"
    cache.config.eviction_policy = "sliding_window"  # without a size: a max_sequence_length window
    write(cache, "c", 8)
    assert cache.sequence_ids == ["c"]  # nothing outside the window: whole sequences go, as under LRU
    cache.config.sliding_window_size = 0  # an impossible window: a clear error at the next decision
    with pytest.raises(ValueError, match="sliding_window_size=0: SLIDING_WINDOW needs a positive int"):
        write(cache, "d", 8)


# ---------------------------------------------------------------------------------- sharing
def test_prefix_sharing_reuses_full_blocks_by_token_hash():
    cache = make(blocks=16)
    prompt = list(range(11))  # 2 full blocks + 3 tokens
    assert cache.add_sequence("first", prompt) == 0
    write(cache, "first", 11, fill=0)
    assert cache.match_prefix(prompt) == 8 and cache.match_prefix([0, 1, 2, 3, 99, 5, 6, 7]) == 4
    assert cache.match_prefix([1] + prompt[1:]) == 0  # a different first token changes every hash
    reused = cache.add_sequence("second", prompt[:8] + [50, 51])
    assert reused == 8 and cache.block_table("second") == cache.block_table("first")[:2]
    assert cache.pool.ref_counts[cache.block_table("first")[0]] == 2
    write(cache, "second", 2, fill=500)  # prefill only the 2 new tokens
    k, _ = cache.get_cache(0, "second")
    assert torch.equal(k[:8], kv(11, 0)[0][:8]) and torch.equal(k[8:], kv(2, 500)[0])
    assert torch.equal(cache.get_cache(0, "first")[0], kv(11, 0)[0])  # untouched
    stats = cache.get_global_stats()["prefix_cache"]
    assert stats["hit_tokens"] == 8 and stats["queries"] == 2


def test_a_whole_cached_prompt_leaves_one_token_to_prefill_and_copies_its_block_on_write():
    cache = make(blocks=16)
    prompt = list(range(8))
    cache.add_sequence("a", prompt)
    write(cache, "a", 8)
    assert cache.add_sequence("b", prompt) == 7  # the last token's logits must be computed
    shared = cache.block_table("b")[1]
    write(cache, "b", 1, fill=7)  # rewrites token 7 into the shared block: copy on write
    assert cache.block_table("b")[1] != shared and cache.block_table("a")[1] == shared
    assert cache.get_global_stats()["memory_pool"]["cow_copies"] == 1
    assert torch.equal(cache.get_cache(0, "a")[0], cache.get_cache(0, "b")[0])


def test_rewriting_an_indexed_block_takes_it_out_of_the_prefix_index():
    cache = make(blocks=16)
    cache.add_sequence("a", [1, 2, 0, 1, 5])
    write(cache, "a", 5)  # block 0 = tokens 1 2 0 1, indexed
    assert cache.match_prefix([1, 2, 0, 1]) == 4
    cache.crop_sequence("a", 2)  # roll back into the indexed block ...
    cache.append_token_ids("a", [7])
    write(cache, "a", 1, fill=70)  # ... and write a different token 2 into it
    assert cache.match_prefix([1, 2, 0, 1]) == 0  # the index must not promise the old tokens
    assert cache.add_sequence("b", [1, 2, 0, 1, 5]) == 0


def test_generated_tokens_become_reusable_for_the_next_turn_of_a_conversation():
    cache = make(blocks=16)
    cache.add_sequence("turn1", [1, 2, 3])
    write(cache, "turn1", 3)
    for token in (4, 5, 6, 7, 8):  # decoding: record each generated token and write its keys/values
        cache.append_token_ids("turn1", [token])
        write(cache, "turn1", 1)
    assert cache.match_prefix([1, 2, 3, 4, 5, 6, 7, 8, 9]) == 8  # prompt + answer, 2 full blocks
    assert cache.add_sequence("turn2", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]) == 8


def test_freed_prefix_blocks_stay_cached_until_reused():
    cache = make("lru", blocks=4)
    cache.add_sequence("a", list(range(8)))
    write(cache, "a", 8)
    cache.clear_sequence("a")
    assert cache.pool.num_cached_free == 2 and cache.match_prefix(list(range(8))) == 8
    write(cache, "c", 8)  # takes the 2 never-hashed free blocks: cached ones are given out last
    assert cache.match_prefix(list(range(8))) == 8
    assert cache.add_sequence("b", list(range(8)) + [9]) == 8  # revived, not recomputed
    assert cache.get_global_stats()["memory_pool"]["revived"] == 2
    assert torch.equal(cache.get_cache(0, "b", 8)[0], kv(8, 0)[0])
    cache.clear_sequence("b")
    write(cache, "d", 4)  # the pool is full of cached blocks: the oldest one is reused
    assert cache.match_prefix(list(range(8))) == 0
    cache.check_invariants()


def test_fork_shares_blocks_and_copy_on_write_keeps_both_sides_intact():
    cache = make(blocks=8)
    write(cache, "p", 6, fill=0)  # blocks: [full, half]
    cache.fork_sequence("p", "c")
    assert cache.block_table("c") == cache.block_table("p") and cache.pool.num_used == 2
    write(cache, "c", 1, fill=100)
    write(cache, "p", 1, fill=200)
    assert cache.block_table("c")[0] == cache.block_table("p")[0]  # the full block stays shared
    assert cache.block_table("c")[1] != cache.block_table("p")[1]
    base = kv(6, 0)[0]
    assert torch.equal(cache.get_cache(0, "c")[0], torch.cat([base, kv(1, 100)[0]]))
    assert torch.equal(cache.get_cache(0, "p")[0], torch.cat([base, kv(1, 200)[0]]))
    cache.check_invariants()


def test_crop_frees_blocks_and_optimize_memory_compacts_and_releases():
    cache = make(blocks=64)
    for i in range(6):
        write(cache, i, 8, fill=i)
    for i in (0, 2, 4):
        cache.clear_sequence(i)
    cache.crop_sequence(5, 5)
    assert cache.sequence_length(5) == 5 and len(cache.block_table(5)) == 2
    before = cache.memory_bytes()
    report = cache.optimize_memory()
    assert report["bytes_released"] > 0 and cache.memory_bytes() == 6 * BYTES_PER_BLOCK < before
    assert sorted(b for i in (1, 3, 5) for b in cache.block_table(i)) == list(range(6))
    for i in (1, 3):
        assert torch.equal(cache.get_cache(1, i)[0], kv(8, i)[0])
    assert torch.equal(cache.get_cache(1, 5)[0], kv(8, 5)[0][:5])
    cache.check_invariants()


def test_reservation_mode_reserves_max_sequence_length_per_sequence():
    cache = make(blocks=40, use_memory_pool=False, max_sequence_length=16)
    write(cache, "a", 1)
    usage = cache.usage()
    assert usage["used_blocks"] == 4 and usage["filled_slots"] == 1 and usage["waste"] == pytest.approx(15 / 16)
    assert cache.add_sequence("b", [1, 2, 3, 4, 5]) == 0  # nothing is shared
    with pytest.raises(ValueError, match="needs use_memory_pool=True"):
        cache.fork_sequence("a", "c")


# ---------------------------------------------------------------------------------- monitor
def test_monitor_averages_trend_and_recommendations():
    cache = make("lru", blocks=4)
    monitor = CachePerformanceMonitor(cache, window=6)
    assert monitor.analyze_performance() == {"status": "insufficient_data", "samples": 0}
    write(cache, "a", 4)
    for step in range(6):  # hits first, then only misses: a degrading hit rate
        for _ in range(4):
            cache.get_cache(0, "a" if step < 3 else "gone")
        monitor.collect_metrics()
    a = monitor.analyze_performance()
    assert a["status"] == "ok" and a["avg_hit_rate"] == pytest.approx(8 / 20)  # intervals after the first
    assert a["hit_rate_trend"] == "degrading" and a["samples"] == 6
    assert any("Low hit rate" in r for r in a["recommendations"])
    assert any("degrading" in r for r in a["recommendations"])
    for sid in range(8):  # now a full pool that keeps evicting
        write(cache, sid, 8)
        monitor.collect_metrics()
    a = monitor.analyze_performance()
    assert a["evictions"] > 0 and any("evicting" in r for r in a["recommendations"])
    assert monitor.metrics_history[-1]["memory_usage_mb"] == cache.get_global_stats()["total_memory_mb"]


def test_monitor_rejects_bad_arguments():
    with pytest.raises(TypeError, match="cache must be an AdvancedKVCache, got dict"):
        CachePerformanceMonitor({})
    with pytest.raises(ValueError, match="window must be an int >= 2"):
        CachePerformanceMonitor(make(), window=1)


def test_monitor_recommends_less_memory_when_hits_are_high_and_the_pool_is_empty():
    cache = make("lru", blocks=400)
    monitor = CachePerformanceMonitor(cache)
    write(cache, "a", 4)
    for _ in range(3):
        cache.get_cache(0, "a")
        monitor.collect_metrics()
    a = monitor.analyze_performance()
    assert a["hit_rate_trend"] == "stable" and any("could be reduced" in r for r in a["recommendations"])


# ---------------------------------------------------------------------------------- mixin
class TinyCachedAttention(CachedAttentionMixin, nn.Module):
    """A minimal causal attention layer written for this test, caching through the mixin."""

    def __init__(self, layer_id, dim=H * D, heads=H):
        super().__init__()
        self.layer_id, self.heads = layer_id, heads
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x, sequence_id=None):  # x: (S, dim) new tokens of one sequence
        S = x.shape[0]
        q, k, v = self.qkv(x).view(S, 3, self.heads, -1).unbind(1)
        past = 0 if self.kv_cache is None else self.kv_cache.sequence_length(
            sequence_id, self.layer_id) if sequence_id in self.kv_cache else 0
        k, v = self.cached_kv(self.layer_id, sequence_id, k, v)
        mask = torch.ones(S, k.shape[0], dtype=torch.bool).tril(past)
        y = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
        return y.transpose(0, 1).reshape(S, -1)


def test_mixin_interleaved_sequences_match_full_attention():
    torch.manual_seed(0)
    layers = [TinyCachedAttention(i) for i in range(2)]
    cache = make(blocks=32)
    for layer in layers:
        layer.set_cache(cache)
    xs = {"a": torch.randn(9, H * D), "b": torch.randn(6, H * D)}
    got = {sid: [] for sid in xs}
    steps = [("a", 0, 4), ("b", 0, 3), ("a", 4, 5), ("b", 3, 4), ("a", 5, 9), ("b", 4, 6)]
    with torch.no_grad():
        for sid, lo, hi in steps:  # prefill then decode, the two requests interleaved
            h = xs[sid][lo:hi]
            for layer in layers:
                h = layer(h, sid)
            got[sid].append(h)
        for sid, x in xs.items():
            for layer in layers:
                layer.set_cache(None)
            full = x
            for layer in layers:
                full = layer(full)
            assert torch.allclose(torch.cat(got[sid]), full, atol=1e-6), sid
    assert cache.get_global_stats()["per_layer"][0] == dict(hits=4, misses=2, hit_rate=4 / 6)
    layers[0].set_cache(cache, "a")
    layers[0].clear_cached()
    assert "a" not in cache and "b" in cache


def test_mixin_batched_rows_and_no_cache_passthrough():
    layer = TinyCachedAttention(0)
    k = torch.randn(2, 3, H, D)
    assert layer.cached_kv(0, ["x", "y"], k, k)[0] is k  # no cache attached
    cache = make(blocks=8)
    layer.set_cache(cache)
    layer.cached_kv(0, ["x", "y"], k, k)
    out, _ = layer.cached_kv(0, ["x", "y"], k[:, :1], k[:, :1])
    assert out.shape == (2, 4, H, D) and torch.equal(out[:, :3], k) and torch.equal(out[:, 3:], k[:, :1])
    with pytest.raises(TypeError, match="cache must be an AdvancedKVCache or None"):
        layer.set_cache({})


# ---------------------------------------------------------------------------------- evicted ids
def test_appending_to_an_evicted_sequence_raises_instead_of_restarting_it_empty():
    """Issue #14: an append to an id the pool evicted used to re-add it as a new, empty
    sequence, and the caller went on without its context.  Now it is an error naming the id;
    a read stays a miss; and each deliberate restart is allowed."""
    cache = make("lru", blocks=4)
    write(cache, "a", 8)
    write(cache, "b", 8)
    write(cache, "c", 4)  # the pool is full: "a" (least recently used) is evicted
    assert "a" not in cache and cache.was_evicted("a") and not cache.was_evicted("b")
    assert cache.get_cache(0, "a") is None and cache.get_cache(0, "a", 4) is None  # a read is a miss
    with pytest.raises(EvictedSequenceError, match=r"sequence_id='a' was evicted .*Re-prefill it"):
        cache.append_cache(0, "a", *kv(1, 0))
    with pytest.raises(EvictedSequenceError, match="sequence_id='a' was evicted"):
        cache.append_and_gather(0, ["c", "a"], *(torch.stack([t, t]) for t in kv(1, 0)))
    assert cache.sequence_length("c", 0) == 4  # the batch failed before any row was written
    with pytest.raises(EvictedSequenceError):
        cache.append_token_ids("a", [1])
    with pytest.raises(UnknownSequenceError):  # still a KeyError for callers that catch that
        cache.crop_sequence("a", 0)
    assert "a" not in cache  # nothing re-added it

    cache.set_cache(0, "a", *kv(3, 5))  # storing the whole K/V is a deliberate restart
    assert not cache.was_evicted("a") and torch.equal(cache.get_cache(0, "a")[0], kv(3, 5)[0])
    write(cache, "x", 16)  # evicts everything else, "a" included
    assert cache.was_evicted("a")
    assert cache.clear_sequence("a") is False and not cache.was_evicted("a")  # acknowledged: reusable
    write(cache, "a", 2)
    assert cache.sequence_length("a", 0) == 2
    write(cache, "y", 16)
    assert cache.was_evicted("a")
    assert cache.add_sequence("a") == 0 and not cache.was_evicted("a")  # add_sequence restarts it too
    cache.check_invariants()


def test_the_memory_of_evicted_ids_is_bounded():
    cache = make("lru", blocks=2, max_batch_size=1, max_remembered_ids=3)
    for i in range(6):
        write(cache, i, 1)  # max_batch_size=1: each new sequence evicts the previous one
    assert [cache.was_evicted(i) for i in range(6)] == [False, False, True, True, True, False]
    assert len(cache._gone) == 3
    write(cache, 0, 1)  # forgotten: reads as never seen (documented), so it may start anew
    with pytest.raises(EvictedSequenceError):
        write(cache, 3, 1)
    cache.clear_all()  # a deliberate reset: every id becomes reusable
    write(cache, 3, 1)
    assert cache.sequence_length(3) == 1


def test_mixin_refuses_to_continue_an_evicted_sequence():
    torch.manual_seed(0)
    layer = TinyCachedAttention(0)
    cache = make("lru", blocks=2)
    layer.set_cache(cache)
    with torch.no_grad():
        layer(torch.randn(6, H * D), "a")
        layer(torch.randn(4, H * D), "b")  # needs a block: "a" is evicted
        with pytest.raises(EvictedSequenceError, match="sequence_id='a' was evicted"):
            layer(torch.randn(1, H * D), "a")


def test_mixin_whole_kv_style_stores_and_returns_what_it_was_given():
    """``_cache_kv`` stores a sequence's whole K/V (replacing), ``_get_cached_kv`` returns at most
    ``seq_len`` tokens as ``(1, n, embed_dim)``, or ``None`` on a miss / without a cache."""
    layer = TinyCachedAttention(0)
    k = torch.randn(1, 5, H * D)
    assert layer._get_cached_kv(0, 5) is None
    layer._cache_kv(0, k, -k)  # no cache attached: nothing happens
    cache = make(blocks=8)
    layer.set_cache(cache, "s")
    assert layer._get_cached_kv(0, 5) is None
    layer._cache_kv(0, k[:, :3], -k[:, :3])
    layer._cache_kv(0, k, -k)  # replaces: 5 tokens, not 8
    got_k, got_v = layer._get_cached_kv(0, 8)
    assert got_k.shape == (1, 5, H * D) and torch.equal(got_k, k) and torch.equal(got_v, -k)
    assert torch.equal(layer._get_cached_kv(0, 2)[0], k[:, :2]) and cache.sequence_length("s", 0) == 5
    with pytest.raises(ValueError, match=r"key is \(2, 5, 8\), expected \(1, n, num_kv_heads \* head_dim\)"):
        layer._cache_kv(0, k.expand(2, 5, H * D), k.expand(2, 5, H * D))
    cache.append_cache(0, "t", torch.randn(4, H, D), torch.randn(4, H, D))  # 3-D writes come back flat too
    layer.set_cache(cache, "t")
    assert layer._get_cached_kv(0)[0].shape == (1, 4, H * D)
