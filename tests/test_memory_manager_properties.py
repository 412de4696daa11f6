"""Random workloads on ``AdvancedKVCache`` checked against an independent model, for every policy.

Each example draws a small config (policy, budget, block size, paged or reserved, preallocated
or growing) and then ~30 random operations on up to 8 sequence ids: add (with a prompt, so
prefixes are matched and shared), extend (``append_cache``, one or all layers), replace
(``set_cache`` of a layer's whole keys/values), read, resume (append to an evicted id), fork,
crop, clear, clear_all, optimize_memory.  Keys and values are a pure function of the token prefix (as in a
real model), so a shared block holds the right data only if sharing is correct, and any write
that leaked into another sequence's block (a broken copy on write) changes what it reads.

After every operation:

* the pool's storage is within ``memory_limit_mb`` and its book-keeping matches the block tables;
* every read hit returns exactly the reference tokens (at most ``seq_len`` of them), every
  predicted miss is a miss;
* appending to an evicted id raises ``EvictedSequenceError`` (it is never restarted empty);
* sequences that vanished without a clear were evicted, and the victims are the ones the
  policy picks (least recently used / lowest reads-per-block) among the unprotected ones;
* sliding-window trimming dropped only whole blocks that were outside the window;
* hits, misses, evictions, sequences and prefix-hit tokens equal the test's own counts.
"""

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kv_cache import (
    AdvancedKVCache, CacheCapacityError, CacheConfig, EvictedSequenceError, PoolExhaustedError, UnknownSequenceError,
)

H, D, LAYERS, MAX_LEN, IDS = 1, 4, 2, 24, range(8)


def content(tokens, layer):
    """Keys/values of a token sequence: position p depends on tokens[0..p] (exact small floats)."""
    r, rows = 0, []
    for t in tokens:
        r = (r * 31 + t + 1) % 9973
        rows.append(r)
    k = torch.tensor(rows, dtype=torch.float32)[:, None, None] * 16 + layer * 8 + torch.arange(H * D).view(1, H, D)
    return k, -k - 1


class Ref:
    """The test's own account of one sequence."""

    def __init__(self, tokens, lengths, start=0):
        self.tokens, self.lengths, self.start = list(tokens), list(lengths), start

    def copy(self):
        return Ref(self.tokens, self.lengths, self.start)


@st.composite
def configs(draw):
    policy = draw(st.sampled_from(["none", "lru", "sliding_window", "adaptive"]))
    block_size = draw(st.sampled_from([2, 4]))
    pooled = draw(st.booleans()) if policy != "sliding_window" else True
    min_blocks = MAX_LEN // block_size if not pooled else 2
    blocks = draw(st.integers(min_blocks, min_blocks + 16))
    bytes_per_block = block_size * 2 * LAYERS * H * D * 4
    return CacheConfig(max_batch_size=draw(st.integers(2, 6)), max_sequence_length=MAX_LEN, embed_dim=H * D,
                       num_heads=H, num_layers=LAYERS, eviction_policy=policy, block_size=block_size,
                       sliding_window_size=draw(st.integers(1, 6)) if policy == "sliding_window" else None,
                       memory_limit_mb=blocks * bytes_per_block / 2 ** 20, preallocate_memory=draw(st.booleans()),
                       use_memory_pool=pooled)


OPS = ["add"] * 2 + ["extend"] * 5 + ["read"] * 3 + ["replace", "resume", "fork", "crop", "clear", "clear_all",
                                                   "optimize"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cfg=configs(), data=st.data())
def test_random_workload_matches_the_reference(cfg, data):
    cache = AdvancedKVCache(cfg)
    refs, retired, evicted_ids = {}, set(), set()
    counts = dict(hits=0, misses=0, evicted=0, prefix_hit_tokens=0, prefix_queries=0)
    system_prompt = data.draw(st.lists(st.integers(0, 2), min_size=8, max_size=8), label="system prompt")
    tokens = st.lists(st.integers(0, 2), min_size=1, max_size=8)

    for _ in range(data.draw(st.integers(10, 40), label="n_ops")):
        op = data.draw(st.sampled_from(OPS), label="op")
        held = sorted(refs)
        before = {sid: cache.sequence_info(sid) for sid in held}
        protected, cleared = set(), set()

        if op == "add":
            sid = data.draw(st.sampled_from([i for i in IDS if i not in refs] or [0]), label="sid")
            if sid in refs:
                continue
            shared = data.draw(st.sampled_from([0, 4, 6, 8, 8]), label="system prompt tokens")
            prompt = system_prompt[:shared] + data.draw(tokens, label="own tokens")
            match = cache.match_prefix(prompt)
            protected.add(sid)
            try:
                n = cache.add_sequence(sid, prompt)
            except CacheCapacityError:  # max_batch_size or (PoolExhaustedError) a full pool
                assert cfg.eviction_policy.value == "none" and sid not in cache  # the others evict instead
            else:
                assert n <= min(match, len(prompt) - 1) and (n == match or n == len(prompt) - 1)
                assert n % cfg.block_size == 0 or n == len(prompt) - 1
                if not cfg.use_memory_pool:
                    assert n == 0
                refs[sid] = Ref(prompt, [n] * LAYERS)
                retired.discard(sid)
                evicted_ids.discard(sid)  # add_sequence is a deliberate restart
                counts["prefix_hit_tokens"] += n
                counts["prefix_queries"] += 1

        elif op == "extend" and held:
            sid = data.draw(st.sampled_from(held), label="sid")
            ref, protected = refs[sid], {sid}
            new = data.draw(tokens, label="new tokens")
            if len(ref.tokens) + len(new) > MAX_LEN:
                if ref.lengths[0] == len(ref.tokens):
                    k, v = content(ref.tokens + new, 0)
                    with pytest.raises(CacheCapacityError, match=f"exceeds max_sequence_length={MAX_LEN}"):
                        cache.append_cache(0, sid, k[-len(new):], v[-len(new):])
                continue
            cache.append_token_ids(sid, new)
            ref.tokens += new
            layers = [0] if data.draw(st.booleans(), label="partial") else range(LAYERS)
            for layer in layers:
                if sid not in cache:
                    break
                lo, hi = ref.lengths[layer], len(ref.tokens)
                if lo == hi:
                    continue
                k, v = content(ref.tokens, layer)
                try:
                    cache.append_cache(layer, sid, k[lo:hi], v[lo:hi])
                except PoolExhaustedError:
                    assert cache.sequence_length(sid, layer) == lo  # nothing written
                else:
                    ref.lengths[layer] = hi

        elif op == "read":
            sid = data.draw(st.sampled_from(list(IDS)), label="sid")
            layer = data.draw(st.integers(0, LAYERS - 1), label="layer")
            ref = refs.get(sid)
            seq_len = data.draw(st.one_of(st.none(), st.integers(1, 1 + (ref.lengths[layer] if ref else 2))))
            got = cache.get_cache(layer, sid, seq_len)
            if ref is None:
                hit = False
            elif seq_len is None:
                hit = ref.lengths[layer] > ref.start
            else:
                hit = ref.start == 0 and ref.lengths[layer] > 0
            counts["hits" if hit else "misses"] += 1
            if not hit:
                assert got is None
            else:
                k, v = content(ref.tokens[:ref.lengths[layer]], layer)
                lo, hi = (ref.start, ref.lengths[layer]) if seq_len is None else (0, min(seq_len, ref.lengths[layer]))
                assert torch.equal(got[0], k[lo:hi]) and torch.equal(got[1], v[lo:hi]), f"read of {sid} differs"

        elif op == "replace" and held:  # set_cache: a layer's whole keys/values, shorter or longer
            sid = data.draw(st.sampled_from(held), label="sid")
            ref, protected = refs[sid], {sid}
            layer = data.draw(st.integers(0, LAYERS - 1), label="layer")
            n = data.draw(st.integers(0, len(ref.tokens)), label="replace length")
            k, v = content(ref.tokens[:n], layer)
            restart = ref.start > 0
            if restart:  # the window dropped its first blocks: the sequence restarts from token 0
                ref.lengths, ref.start = [0] * LAYERS, 0
            try:
                cache.set_cache(layer, sid, k, v)
            except PoolExhaustedError:  # only NONE refuses, or a whole K/V bigger than the pool
                assert cfg.eviction_policy.value == "none" or -(-n // cfg.block_size) > cfg.max_blocks
                assert cache.sequence_length(sid, layer) == ref.lengths[layer]  # this layer unchanged
            else:
                ref.lengths[layer] = n
                event("replaced a layer" + (" after a window trim" if restart else ""))

        elif op == "resume" and evicted_ids:  # continuing an evicted sequence must fail loudly
            sid = data.draw(st.sampled_from(sorted(evicted_ids)), label="sid")
            assert cache.was_evicted(sid) and cache.get_cache(0, sid) is None
            with pytest.raises(EvictedSequenceError, match=f"sequence_id={sid} was evicted"):
                cache.append_cache(0, sid, *content([1], 0))
            counts["misses"] += 1
            event("refused to resume an evicted id")

        elif op == "fork" and held:
            parent = data.draw(st.sampled_from(held), label="parent")
            child = data.draw(st.sampled_from([i for i in IDS if i not in refs] or [parent]), label="child")
            if child in refs:
                continue
            protected = {parent, child}
            if not cfg.use_memory_pool:
                with pytest.raises(ValueError, match="needs use_memory_pool=True"):
                    cache.fork_sequence(parent, child)
                continue
            try:
                cache.fork_sequence(parent, child)
            except CacheCapacityError:
                assert child not in cache
            else:
                refs[child] = refs[parent].copy()
                retired.discard(child)
                evicted_ids.discard(child)

        elif op == "crop" and held:
            sid = data.draw(st.sampled_from(held), label="sid")
            ref = refs[sid]
            keep = data.draw(st.integers(0, max(ref.lengths)), label="keep")
            protected = {sid}
            if keep < ref.start:
                with pytest.raises(ValueError, match="dropped by the sliding window"):
                    cache.crop_sequence(sid, keep)
                continue
            cache.crop_sequence(sid, keep)
            ref.tokens, ref.lengths = ref.tokens[:keep], [min(n, keep) for n in ref.lengths]

        elif op == "clear":
            sid = data.draw(st.sampled_from(list(IDS)), label="sid")
            if sid in refs:
                assert cache.clear_sequence(sid) is True
                cleared.add(sid)
            elif sid in retired:
                assert cache.clear_sequence(sid) is False
                evicted_ids.discard(sid)  # acknowledged: the id may be reused
            else:
                with pytest.raises(UnknownSequenceError, match="never added"):
                    cache.clear_sequence(sid)

        elif op == "clear_all" and data.draw(st.integers(0, 3)) == 0:
            cache.clear_all()
            cleared |= set(refs)
            evicted_ids.clear()

        elif op == "optimize":
            cache.optimize_memory()

        # ---- what vanished, and was it the policy's choice?
        for sid in cleared:
            del refs[sid]
            retired.add(sid)
        evicted = {sid for sid in refs if sid not in cache}
        if evicted:
            assert cfg.eviction_policy.value != "none", "NONE must never evict"
            cands = [sid for sid in before if sid in refs and sid not in protected]
            if cfg.eviction_policy.value == "adaptive":
                rank = lambda s: (before[s]["hits"] / max(1, before[s]["blocks"]), before[s]["last_use"])  # noqa: E731
            else:
                rank = lambda s: before[s]["last_use"]  # noqa: E731
            assert evicted == set(sorted(cands, key=rank)[:len(evicted)]), (evicted, before)
            for sid in evicted:
                del refs[sid]
                retired.add(sid)
                evicted_ids.add(sid)
            counts["evicted"] += len(evicted)
        assert sorted(cache.sequence_ids) == sorted(refs)

        # ---- sliding window: only whole blocks that left the window
        for sid, ref in refs.items():
            start = cache.sequence_info(sid)["start"]
            if cfg.eviction_policy.value != "sliding_window":
                assert start == 0
            elif start != ref.start:
                assert start > ref.start and start % cfg.block_size == 0
                assert start <= max(0, min(ref.lengths) - cfg.sliding_window_size)
                ref.start = start
            assert [cache.sequence_length(sid, l) for l in range(LAYERS)] == ref.lengths

        # ---- memory and statistics
        assert cache.memory_bytes() <= cfg.memory_limit_mb * 2 ** 20
        cache.check_invariants()
        stats = cache.get_global_stats()
        assert (stats["hits"], stats["misses"]) == (counts["hits"], counts["misses"])
        assert stats["sequences_evicted"] == counts["evicted"] and stats["num_sequences"] == len(refs)
        assert stats["prefix_cache"]["hit_tokens"] == counts["prefix_hit_tokens"]
        assert stats["prefix_cache"]["queries"] == counts["prefix_queries"]
        assert stats["tokens_stored"] == sum(max(r.lengths) - r.start for r in refs.values())
        used = {b for sid in refs for b in cache.block_table(sid) if b is not None}
        assert stats["memory_pool"]["used_blocks"] == len(used)

    # What this example exercised (pytest --hypothesis-show-statistics prints the tally).
    stats = cache.get_global_stats()
    pool = stats["memory_pool"]
    event(f"policy={cfg.eviction_policy.value} pooled={cfg.use_memory_pool}")
    for name, happened in (("evicted a sequence", counts["evicted"]), ("shared a prefix", counts["prefix_hit_tokens"]),
                           ("copied on write", pool["cow_copies"]), ("trimmed a window", stats["blocks_trimmed"]),
                           ("revived a cached block", pool["revived"]), ("grew the storage", pool["grows"])):
        if happened:
            event(name)



@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(block_size=st.sampled_from([2, 3, 4]), data=st.data())
def test_shared_blocks_are_never_corrupted_by_another_sequences_writes(block_size, data):
    """Prefix sharing, forks, crops and rewrites with a pool that never evicts: after every
    write, *every* sequence still reads exactly its own tokens' keys/values."""
    cfg = CacheConfig(max_batch_size=8, max_sequence_length=MAX_LEN, embed_dim=H * D, num_heads=H, num_layers=LAYERS,
                      eviction_policy="none", block_size=block_size, memory_limit_mb=1)
    cache, seqs = AdvancedKVCache(cfg), {}
    system_prompt = [1, 2, 0, 1, 2, 0, 1, 2]

    def write_all(sid):
        for layer in range(LAYERS):
            k, v = content(seqs[sid], layer)
            n = cache.sequence_length(sid, layer)
            cache.append_cache(layer, sid, k[n:], v[n:])

    for _ in range(data.draw(st.integers(5, 25), label="n_ops")):
        op = data.draw(st.sampled_from(["add", "add", "fork", "fork", "extend", "rewrite", "rewrite", "clear"]),
                       label="op")
        free_ids = [i for i in IDS if i not in seqs]
        if op == "add" and free_ids:
            sid = free_ids[0]
            own = data.draw(st.lists(st.integers(0, 2), max_size=3))
            seqs[sid] = system_prompt[:data.draw(st.integers(1, 8))] + own
            cache.add_sequence(sid, seqs[sid])
            write_all(sid)
        elif op == "fork" and seqs and free_ids:
            parent = data.draw(st.sampled_from(sorted(seqs)), label="parent")
            cache.fork_sequence(parent, free_ids[0])
            seqs[free_ids[0]] = list(seqs[parent])
        elif op == "clear" and seqs:
            sid = data.draw(st.sampled_from(sorted(seqs)), label="sid")
            cache.clear_sequence(sid)
            del seqs[sid]
        elif op in ("extend", "rewrite") and seqs:
            sid = data.draw(st.sampled_from(sorted(seqs)), label="sid")
            if op == "rewrite":  # roll back into (possibly shared, possibly indexed) blocks, then diverge
                keep = data.draw(st.integers(0, len(seqs[sid])), label="keep")
                cache.crop_sequence(sid, keep)
                del seqs[sid][keep:]
            new = data.draw(st.lists(st.integers(0, 2), min_size=1, max_size=4), label="new")
            if len(seqs[sid]) + len(new) <= MAX_LEN:
                cache.append_token_ids(sid, new)
                seqs[sid] += new
                write_all(sid)
        for sid, toks in seqs.items():
            for layer in range(LAYERS):
                got = cache.get_cache(layer, sid)
                k, v = content(toks, layer)
                assert (got is None and not toks) or (torch.equal(got[0], k) and torch.equal(got[1], v)), sid
        cache.check_invariants()
    stats = cache.get_global_stats()["memory_pool"]
    if stats["cow_copies"]:
        event("copied on write")
    if cache.get_global_stats()["prefix_cache"]["hit_tokens"]:
        event("shared a prefix")
