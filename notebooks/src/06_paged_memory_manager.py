# %% [markdown]
# # A paged KV memory manager
#
# One request, one cache is easy. A server answers *many* requests at once from one fixed
# amount of memory, and that is where KV caches waste most of it: a cache sized for the longest
# answer a request *might* give reserves memory the request almost never uses. The vLLM paper
# measured 60-80% of KV memory reserved but never written.
#
# PagedAttention borrows the operating system's answer, **paging**. In this notebook we
#
# 1. build an `AdvancedKVCache` -- one pool of fixed-size *blocks* -- and draw its *block tables*;
# 2. share a prompt prefix between requests (reference counts, copy on write);
# 3. watch the eviction policies at work when the pool is full;
# 4. generate with a real model through the pool and check the tokens against a plain cache;
# 5. follow the statistics of a random workload, and measure the memory paging saves.

# %%
import random

import matplotlib.pyplot as plt
import torch
from matplotlib.patches import Rectangle

from kv_cache import (AdvancedKVCache, CacheConfig, CachePerformanceMonitor, DynamicKVCache,
                      PagedCacheView, PoolExhaustedError)
from transformer import DecoderOnlyTransformer, ModelConfig, generate

torch.manual_seed(0)
torch.set_num_threads(1)  # tiny tensors: one thread is fastest and steadiest
plt.rcParams.update({"figure.figsize": (6, 3), "figure.dpi": 80})

# %% [markdown]
# ## 1. Blocks, block tables, a free list
#
# The pool is one tensor cut into blocks of `block_size` tokens (keys and values of every layer).
# A sequence owns a **block table**: its logical block *i* (tokens `4i .. 4i+3` below) lives in
# physical block `table[i]`, wherever that is. Blocks come from a **free list**, one at a time,
# only when a sequence crosses a block boundary -- so a sequence wastes at most the unused end of
# its last block.
#
# The budget is a hard limit: `memory_limit_mb` fixes `max_blocks`, and the pool never allocates
# more. Here: 2 layers, 2 key/value heads of size 4, blocks of 4 tokens, room for 12 blocks.

# %%
H, D, BS = 2, 4, 4
BYTES_PER_BLOCK = BS * 2 * 2 * H * D * 4  # tokens x (k, v) x layers x heads x dim x fp32


def small_manager(policy="lru", blocks=12, **kw):
    settings = dict(max_batch_size=8, max_sequence_length=64, embed_dim=H * D, num_heads=H, num_layers=2,
                    block_size=BS, eviction_policy=policy, memory_limit_mb=blocks * BYTES_PER_BLOCK / 2 ** 20,
                    preallocate_memory=True)
    settings.update(kw)
    return AdvancedKVCache(CacheConfig(**settings))


def write(cache, sid, n):
    """Append n tokens to every layer of sequence sid (random keys/values)."""
    for layer in range(2):
        cache.set_cache(layer, sid, torch.randn(n, H, D), torch.randn(n, H, D))


COLORS = plt.get_cmap("tab10").colors


def draw(cache, title):
    """Top: the physical pool (colour = owner, number = reference count if shared, grey = a freed
    block still remembered for prefix reuse). Bottom: each sequence's block table."""
    ids = cache.sequence_ids
    color = {sid: COLORS[i % 10] for i, sid in enumerate(ids)}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 1.2 + 0.35 * len(ids)),
                                      gridspec_kw={"height_ratios": [1, max(1, len(ids))]})
    pool = cache.pool
    owner = {}
    for sid in ids:
        for b in cache.block_table(sid):
            if b is not None:
                owner.setdefault(b, sid)
    for b in range(pool.capacity):
        face = color[owner[b]] if b in owner else ("0.85" if pool.block_hashes[b] is not None else "white")
        top.add_patch(Rectangle((b, 0), 1, 1, facecolor=face, edgecolor="black"))
        if pool.ref_counts[b] > 1:
            top.text(b + 0.5, 0.5, f"x{pool.ref_counts[b]}", ha="center", va="center", fontsize=8)
    top.set_xlim(0, pool.capacity), top.set_ylim(0, 1), top.set_yticks([])
    top.set_xticks([b + 0.5 for b in range(pool.capacity)], range(pool.capacity), fontsize=7)
    top.set_title(f"{title}\nphysical blocks ({pool.num_used} used / {pool.max_blocks})", fontsize=9)
    for row, sid in enumerate(ids):
        table, length = cache.block_table(sid), cache.sequence_length(sid)
        for i, b in enumerate(table):
            filled = min(BS, max(0, length - i * BS)) / BS
            y = len(ids) - 1 - row
            bottom.add_patch(Rectangle((i, y), 1, 0.8, facecolor="white", edgecolor="black"))
            if b is not None:
                bottom.add_patch(Rectangle((i, y), filled, 0.8, facecolor=color[sid], alpha=0.8))
            bottom.text(i + 0.5, y + 0.4, "-" if b is None else str(b), ha="center", va="center", fontsize=8)
    n_logical = max([len(cache.block_table(s)) for s in ids] + [1])
    bottom.set_xlim(0, n_logical)
    bottom.set_xticks(range(n_logical + 1))
    bottom.set_ylim(0, max(1, len(ids)))
    bottom.set_yticks([len(ids) - 1 - r + 0.4 for r in range(len(ids))], [str(s) for s in ids], fontsize=8)
    bottom.set_xlabel("logical block (number = physical block, fill = tokens written)", fontsize=8)
    bottom.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    plt.show()


cache = small_manager()
write(cache, "alice", 6)
write(cache, "bob", 9)
write(cache, "alice", 3)  # alice grows: her 3rd block comes from wherever the free list points
write(cache, "carol", 2)
print({sid: cache.block_table(sid) for sid in cache.sequence_ids})
draw(cache, "three requests, blocks taken on demand")

# %% [markdown]
# Alice's blocks are not contiguous -- they do not need to be: reading her keys is a gather over
# the *slots* `table[p // 4] * 4 + p % 4`. The waste is the unfilled end of each last block:

# %%
usage = cache.usage()
print(f"tokens stored {usage['filled_slots']}, slots reserved {usage['reserved_slots']}, "
      f"waste {usage['waste']:.0%}")
k, v = cache.get_cache(0, "alice")
print("alice's keys, layer 0:", tuple(k.shape))
assert usage["filled_slots"] == 9 + 9 + 2

# %% [markdown]
# ## 2. Prefix sharing and copy on write
#
# Requests often start with the same system prompt. A *full* block is identified by a hash of
# its tokens **and of every token before it** (vLLM's chained block hash), so
# `add_sequence(id, token_ids)` can find the longest run of full blocks already computed and
# point the new request at them: a **reference count** per block says how many tables use it.
# The new request only prefills the rest. A shared block is read-only; the first write to it
# copies it (**copy on write**).

# %%
cache = small_manager(blocks=16)
system = list(range(100, 110))  # a 10-token system prompt: 2 full blocks + 2 tokens
first = system + [1, 2, 3]
print("first request reuses", cache.add_sequence("q1", first), "tokens")
write(cache, "q1", len(first))
second = system + [7]  # 11 tokens: the last block is partly filled
reused = cache.add_sequence("q2", second)
print("second request reuses", reused, "tokens; it prefills only", len(second) - reused)
write(cache, "q2", len(second) - reused)
cache.fork_sequence("q2", "q2-beam")  # e.g. a second beam: shares everything, copies nothing
draw(cache, "q2 shares q1's full blocks; q2-beam shares all of q2")
assert reused == 8 and cache.block_table("q2")[:2] == cache.block_table("q1")[:2]

# %%
before = cache.block_table("q2-beam")
write(cache, "q2-beam", 1)  # writes into the shared last block -> copied first
after = cache.block_table("q2-beam")
print("q2-beam table before", before, "after", after)
print("copies on write:", cache.get_global_stats()["memory_pool"]["cow_copies"])
assert before[2] != after[2] and cache.block_table("q2")[2] == before[2]
print("PREFIX SHARING CHECK PASSED")

# %% [markdown]
# ## 3. When the pool is full: eviction
#
# `memory_limit_mb` is a hard limit, so something must give when a block is needed and none is
# free. `EvictionPolicy` decides:
#
# | policy | frees |
# | --- | --- |
# | `NONE` | nothing: raises `PoolExhaustedError` (reproducible, never loses data) |
# | `LRU` | whole sequences, least recently used first |
# | `SLIDING_WINDOW` | a sequence's oldest blocks, once they are `sliding_window_size` tokens behind its end |
# | `ADAPTIVE` | whole sequences with the fewest *read hits per block held* (ties: least recently used) |

# %%
cache = small_manager("lru", blocks=8)
for sid in ("a", "b", "c", "d"):
    write(cache, sid, 8)  # 2 blocks each: the pool is full
cache.get_cache(0, "a")  # reading "a" makes it recently used; "b" is now the oldest
draw(cache, "LRU: a full pool")
write(cache, "e", 5)  # needs 2 blocks
print("evicted:", list(cache.eviction_log))
draw(cache, "LRU: 'b' (least recently used) made room for 'e'")
assert [e[1] for e in cache.eviction_log] == ["b"] and cache.get_cache(0, "b") is None

# %%
window = small_manager("sliding_window", blocks=6, sliding_window_size=6)
write(window, "stream", 20)  # 5 blocks
write(window, "other", 4)  # the 6th block: the pool is full
write(window, "stream", 4)  # needs a block: drop stream's blocks that are entirely > 6 tokens old
print("stream's table:", window.block_table("stream"), "first token still held:",
      window.sequence_info("stream")["start"])
draw(window, "SLIDING_WINDOW: old blocks of 'stream' dropped ('-')")

strict = small_manager("none", blocks=2)
write(strict, "x", 8)
try:
    write(strict, "y", 1)
except PoolExhaustedError as err:
    print("NONE:", str(err)[:110], "...")

adaptive = small_manager("adaptive", blocks=6)
for sid, n in (("hot", 4), ("big", 12), ("cold", 4)):
    write(adaptive, sid, n)
for _ in range(3):
    adaptive.get_cache(0, "hot")  # oldest, but read often
adaptive.get_cache(0, "big")
write(adaptive, "new", 8)
print("ADAPTIVE evicted:", [e[1] for e in adaptive.eviction_log], "(never read), kept 'hot' although it is oldest")
assert window.sequence_info("stream")["start"] == 12 and "hot" in adaptive
print("EVICTION CHECK PASSED")

# %% [markdown]
# ## 4. A real model generates through the pool
#
# `PagedCacheView(manager, sequence_ids)` is a `kv_cache.Cache`: batch row *i* is sequence
# `sequence_ids[i]`. `generate()` does not know it talks to a paged pool. Three prompts of
# different lengths (left padded) decode together; each must get exactly the tokens it gets
# alone with a `DynamicKVCache`.

# %%
model = DecoderOnlyTransformer(ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                           max_seq_len=128, pos_encoding="rope")).eval()
prompts = [torch.randint(1, 97, (n,)) for n in (3, 12, 7)]
width = max(len(p) for p in prompts)
ids = torch.zeros(3, width, dtype=torch.long)
mask = torch.zeros(3, width, dtype=torch.long)
for i, p in enumerate(prompts):
    ids[i, width - len(p):], mask[i, width - len(p):] = p, 1

c = model.config
manager = AdvancedKVCache(CacheConfig(max_batch_size=8, max_sequence_length=128, embed_dim=c.d_model,
                                      num_heads=c.n_heads, num_kv_heads=c.n_kv_heads, num_layers=c.n_layers,
                                      block_size=8, memory_limit_mb=1))
with PagedCacheView(manager, ["p0", "p1", "p2"]) as view:
    out = generate(model, ids, 32, cache_implementation=view, attention_mask=mask, eos_token_id=None,
                   output_logits=True)
same = True
for i, p in enumerate(prompts):
    alone = generate(model, p[None], 32, cache_implementation=DynamicKVCache(), eos_token_id=None, output_logits=True)
    same &= torch.equal(out.sequences[i, width:], alone.sequences[0, len(p):])
    assert torch.allclose(out.logits[i], alone.logits[0], atol=1e-5)
print("same tokens:", same)
print("blocks per row:", {sid: len(manager.block_table(sid)) for sid in manager.sequence_ids})
assert same
print("PAGED GENERATION CHECK PASSED")

# %% [markdown]
# ## 5. Statistics over a workload
#
# `CachePerformanceMonitor(cache)` snapshots `get_global_stats()` (`collect_metrics`) and turns
# the recent snapshots into averages, a trend and recommendations (`analyze_performance`).
# Below: 12 conversations take turns in a pool of 16 blocks under LRU. Each turn reads the
# conversation's cache (a miss if it was never written or was evicted) and appends a few tokens.
# Once the pool is full, every new block costs an eviction, and conversations that were evicted
# miss on their next turn.

# %%
rng = random.Random(0)
cache = small_manager("lru", blocks=16, max_batch_size=12)
monitor = CachePerformanceMonitor(cache, window=10)
for step in range(120):
    sid = rng.randrange(12)
    cache.get_cache(0, sid)
    write(cache, sid, rng.randint(1, 6))
    if step % 6 == 5:
        monitor.collect_metrics()
history = monitor.metrics_history
fig, ax = plt.subplots(1, 3, figsize=(9, 2.6))
ax[0].plot([m["interval_hit_rate"] or 0 for m in history], "o-", ms=3)
ax[0].set_title("hit rate per interval", fontsize=9)
ax[1].plot([m["used_memory_mb"] * 1024 for m in history], "o-", ms=3)
ax[1].axhline(cache.config.memory_limit_mb * 1024, color="red", ls="--", label="limit")
ax[1].set_title("KiB in blocks held", fontsize=9)
ax[1].legend(fontsize=7)
ax[2].plot([m["evictions"] for m in history], "o-", ms=3)
ax[2].set_title("evictions (cumulative)", fontsize=9)
for a in ax:
    a.set_xlabel("snapshot", fontsize=8)
fig.tight_layout()
plt.show()
analysis = monitor.analyze_performance()
print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in analysis.items() if k != "recommendations"})
for r in analysis["recommendations"]:
    print(" -", r)
assert max(m["used_memory_mb"] for m in history) <= cache.config.memory_limit_mb

# %% [markdown]
# ## 6. How much memory does paging save?
#
# The benchmark `python -m benchmarks.paged_memory_benchmark` serves a seeded, ShareGPT-like
# workload with continuous batching, once reserving each request's maximum length (the way
# servers worked before PagedAttention) and once with the paged pool. Here is its quick
# version: the fraction of held memory that is reserved but never written, and how many
# requests run at once in the same budget.

# %%
from benchmarks.paged_memory_benchmark import make_workload, quick_config, simulate

cfg = quick_config(progress=False)
workload = make_workload(cfg)
rows = [simulate(workload, cfg, paged=False), simulate(workload, cfg, paged=True)]
fig, ax = plt.subplots(1, 2, figsize=(7, 2.6))
names = [r["mode"] for r in rows]
ax[0].bar(names, [100 * r["waste"] for r in rows], color=["tab:red", "tab:green"])
ax[0].set_title("reserved but unused (%)", fontsize=9)
ax[1].bar(names, [r["mean_in_flight"] for r in rows], color=["tab:red", "tab:green"])
ax[1].set_title("requests in flight (mean)", fontsize=9)
for a in ax:
    a.tick_params(labelsize=8)
fig.tight_layout()
plt.show()
for r in rows:
    print(f"{r['mode']:>20}: waste {r['waste']:.0%}, {r['mean_in_flight']:.1f} requests in flight, "
          f"{r['steps']} steps")
assert rows[1]["waste"] < rows[0]["waste"] and rows[1]["mean_in_flight"] > rows[0]["mean_in_flight"]
print("PAGING SAVES MEMORY: True")
