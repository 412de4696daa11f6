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
import math
import random
from collections import deque

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
        cache.append_cache(layer, sid, torch.randn(n, H, D), torch.randn(n, H, D))


COLORS = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7]  # tab10 without its grey
SEQUENCE_COLOR = {}  # sequence id -> its colour, fixed the first time it is drawn


def color_of(sid):
    """The colour of sequence `sid` in every drawing: a sequence keeps its colour before and after."""
    return SEQUENCE_COLOR.setdefault(sid, COLORS[len(SEQUENCE_COLOR) % len(COLORS)])


def draw(cache, title):
    """Top: the physical pool (colour = owner, number = reference count if shared, grey = a freed
    block still remembered for prefix reuse). Bottom: each sequence's block table."""
    ids = cache.sequence_ids
    color = {sid: color_of(sid) for sid in ids}
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
    top.set_xlabel("physical block", fontsize=8, labelpad=1)
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
    bottom.set_ylabel("sequence", fontsize=8)
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
# miss on their next turn. The manager refuses to *append* to an evicted sequence (its context
# is gone); the conversation has to be restarted with `add_sequence` first.

# %%
def conversations(seed, turns=120, every=6):
    """12 conversations take `turns` random turns in a 16-block LRU pool; a snapshot every `every` turns."""
    rng = random.Random(seed)
    cache = small_manager("lru", blocks=16, max_batch_size=12)
    monitor = CachePerformanceMonitor(cache, window=10)
    for step in range(turns):
        sid = rng.randrange(12)
        if cache.get_cache(0, sid) is None:  # a miss: new, or evicted -- its context is gone,
            cache.add_sequence(sid)  # so the conversation restarts (a server would re-prefill it)
        write(cache, sid, rng.randint(1, 6))
        if step % every == every - 1:
            monitor.collect_metrics()
    return cache, monitor


cache, monitor = conversations(seed=0)
history = monitor.metrics_history
fig, ax = plt.subplots(1, 3, figsize=(9, 2.8))
ax[0].plot([m["interval_hit_rate"] or 0 for m in history], "o-", ms=3)
ax[0].set_title("hit rate per interval", fontsize=9)
ax[0].set_ylabel("hits / lookups", fontsize=8)
ax[1].plot([m["used_memory_mb"] * 1024 for m in history], "o-", ms=3, label="held")
ax[1].axhline(cache.config.memory_limit_mb * 1024, color="red", ls="--", label="limit")
ax[1].set_title("memory in blocks held", fontsize=9)
ax[1].set_ylabel("KiB", fontsize=8)
ax[1].legend(fontsize=7)
ax[2].plot([m["evictions"] for m in history], "o-", ms=3)
ax[2].set_title("evictions (cumulative)", fontsize=9)
ax[2].set_ylabel("sequences evicted", fontsize=8)
for a in ax:
    a.set_xlabel("snapshot (every 6 turns)", fontsize=8)
fig.tight_layout()
plt.show()
analysis = monitor.analyze_performance()
print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in analysis.items() if k != "recommendations"})
for r in analysis["recommendations"]:
    print(" -", r)
assert max(m["used_memory_mb"] for m in history) <= cache.config.memory_limit_mb

# %% [markdown]
# Read the two *trend* words with care. `hit_rate_trend` compares the mean interval hit rate
# of the newer half of the window with the older half (a difference above 0.1 counts), and
# `memory_trend` compares the last snapshot with the first. Both are computed from noisy data:
# an interval holds only 6 lookups, so one interval's hit rate has a standard error of roughly
# $\sqrt{p(1-p)/6}$ (printed below), and memory jumps whenever a sequence is evicted. And this
# workload does not change over time at all -- every turn picks a conversation uniformly at
# random -- so there is no true trend to find. The same workload with other seeds:

# %%
p_hit = analysis["avg_hit_rate"]
print(f"standard error of one interval's hit rate: about {math.sqrt(p_hit * (1 - p_hit) / 6):.2f}")
words = {}
for seed in range(6):
    words[seed] = conversations(seed)[1].analyze_performance()
    print(f"seed {seed}: hit rate {words[seed]['hit_rate_trend']:9s} memory {words[seed]['memory_trend']}")
assert len({w["hit_rate_trend"] for w in words.values()}) > 1  # the same stationary workload, different words

# %% [markdown]
# The words change with the seed of an unchanging workload: they are noise here. The averages
# (hit rate, utilisation, evictions in the window) are the robust part of the report; a trend
# means something only with many lookups per interval, or when it persists over several windows.

# %% [markdown]
# ## 6. How much memory does paging save?
#
# A server answers a queue of requests with *continuous batching*: at every step it admits
# waiting requests, first come first served, while memory allows, writes each admitted prompt's
# keys and values (the prefill), then appends one token to every running request; a request
# leaves when its answer is complete. Below, a seeded queue of 40 requests with lengths drawn
# the way chat traffic looks (log-normal: mostly short, a few long; prompt and answer at most
# 32 tokens each, context 64), served from a budget of 64 blocks = 4 sequences of maximum
# length, in two ways:
#
# * **reserve max length** (`use_memory_pool=False`, how servers worked before
#   PagedAttention): a request reserves room for 64 tokens when it is admitted;
# * **paged**: a request takes a block when its tokens reach it. If the pool runs out
#   anyway, LRU evicts a request, which goes back to the front of the queue and recomputes.
#
# The memory numbers come from the manager's own `usage()`.

# %%
def make_requests(n=40, seed=0, longest=32):
    """(prompt length, answer length) pairs, log-normal around 10 and 12 tokens, 2..`longest`."""
    rng = random.Random(seed)
    draw_length = lambda median: int(min(longest, max(2, rng.lognormvariate(math.log(median), 0.8))))
    return [(draw_length(10), draw_length(12)) for _ in range(n)]


def serve(requests, paged, budget_blocks=64, max_len=64):
    """Continuous batching of `requests` in one KV budget. Returns one (tokens stored, slots
    reserved, requests running) triple per decoding step."""
    cache = small_manager("lru", blocks=budget_blocks, max_batch_size=len(requests), max_sequence_length=max_len,
                          use_memory_pool=paged)
    waiting, running, generated, trace = deque(range(len(requests))), [], [0] * len(requests), []
    while waiting or running:
        while waiting:  # admit, first come first served, while the memory is there
            rid = waiting[0]
            need = requests[rid][0] + generated[rid]  # a preempted request recomputes what it had
            blocks = -(-(need + 1) // BS) if paged else max_len // BS
            if cache.pool.num_free < blocks:
                break
            waiting.popleft()
            cache.add_sequence(rid)
            write(cache, rid, need)  # the prefill
            running.append(rid)
        for rid in reversed(running):  # one decoding step for every running request
            if rid in cache:  # (LRU may have evicted it to make room for another one)
                write(cache, rid, 1)
                generated[rid] += 1
        evicted = [rid for rid in running if rid not in cache]
        waiting.extendleft(reversed(evicted))  # preempted: back to the front of the queue
        running = [rid for rid in running if rid in cache]
        usage = cache.usage()
        trace.append((usage["filled_slots"], usage["reserved_slots"], len(running)))
        for rid in [r for r in running if generated[r] >= requests[r][1]]:
            cache.clear_sequence(rid)  # done: its blocks go back to the free list
            running.remove(rid)
    return trace


requests = make_requests()
print(f"{len(requests)} requests, mean prompt {sum(p for p, _ in requests) / len(requests):.1f} tokens, "
      f"mean answer {sum(a for _, a in requests) / len(requests):.1f} tokens")
traces = {"reserve max length": serve(requests, paged=False), "paged": serve(requests, paged=True)}
budget_slots = 64 * BS
fig, axes = plt.subplots(1, 2, figsize=(9, 3), sharey=True)
for ax, (mode, trace) in zip(axes, traces.items()):
    steps = range(len(trace))
    ax.fill_between(steps, [r for _, r, _ in trace], step="mid", color="tab:orange", alpha=0.35,
                    label="slots reserved")
    ax.fill_between(steps, [f for f, _, _ in trace], step="mid", color="tab:blue", alpha=0.8,
                    label="tokens stored")
    ax.axhline(budget_slots, color="red", ls="--", lw=1, label="budget")
    ax.set_title(f"{mode}: finished in {len(trace)} steps", fontsize=9)
    ax.set_xlabel("decoding step")
axes[0].set_ylabel("KV slots (tokens)")
axes[0].legend(fontsize=7, loc="upper right")
fig.tight_layout()
plt.show()
summary = {}
for mode, trace in traces.items():
    waste = 1 - sum(f for f, _, _ in trace) / sum(r for _, r, _ in trace)
    in_flight = sum(n for _, _, n in trace) / len(trace)
    summary[mode] = (waste, in_flight)
    print(f"{mode:>18}: reserved but unused {waste:.0%}, {in_flight:.1f} requests in flight on average, "
          f"{len(trace)} steps")
assert all(r <= budget_slots for trace in traces.values() for _, r, _ in trace)
assert summary["paged"][0] < summary["reserve max length"][0] and summary["paged"][1] > summary["reserve max length"][1]
print("PAGING SAVES MEMORY: True")

# %% [markdown]
# Reserving the maximum length holds memory that is never written (the orange above the blue):
# most answers are far shorter than the context, so at most 4 requests run at once and the
# queue drains slowly. Paging holds little more than what is written -- the unfilled end of
# each request's last block -- so more requests run side by side, and the same queue finishes
# in fewer steps. `python -m benchmarks.paged_memory_benchmark`, run from a clone of the
# repository, serves 300 requests at real sizes and adds what prefix sharing saves in prefill
# time; the README has its numbers.
#
# ## Exercises: predict, then run
#
# Write your prediction down before you run each cell; the answer is folded below it.
#
# **1.** One sequence of 9 tokens, in blocks of 4 tokens and then in blocks of 16 (the same
# memory budget). How many blocks does it take, and what fraction of their slots is wasted?

# %% tags=["exercise"]
for block_size in (4, 16):
    pool = small_manager(blocks=16, block_size=block_size)
    write(pool, "s", 9)
    usage = pool.usage()
    print(f"block size {block_size:2d}: {len(pool.block_table('s'))} block(s), {usage['reserved_slots']} slots "
          f"for 9 tokens, waste {usage['waste']:.0%}")

# %% [markdown]
# <details><summary>Answer</summary>
#
# Blocks of 4: 3 blocks, 12 slots, 25% waste. Blocks of 16: 1 block, 16 slots, 44% waste. A
# sequence wastes less than one block, so small blocks waste less; large blocks mean shorter
# block tables and fewer, larger reads. vLLM's default is 16 tokens.
# </details>
#
# **2.** Sequence "q" holds 8 tokens: two *full* blocks of 4. Fork it into "q-copy" and append
# one token to "q-copy". How many copy-on-write copies happen?

# %% tags=["exercise"]
pool = small_manager(blocks=16)
write(pool, "q", 8)
pool.fork_sequence("q", "q-copy")
write(pool, "q-copy", 1)
print("q:", pool.block_table("q"), "q-copy:", pool.block_table("q-copy"),
      "copies on write:", pool.get_global_stats()["memory_pool"]["cow_copies"])

# %% [markdown]
# <details><summary>Answer</summary>
#
# None. Token 9 belongs to a third block, which "q-copy" takes fresh from the free list; the two
# full blocks are never written again, so they stay shared (reference count 2). Copy on write
# happens only when a sequence appends into a *partly filled* shared block, as "q2-beam" did in
# section 2. Sharing full blocks is free for good.
# </details>
#
# **3.** The LRU example of section 3 again, but this time we read "b" (instead of "a") before
# "e" arrives. Which sequence is evicted?

# %% tags=["exercise"]
lru = small_manager("lru", blocks=8)
for sid in ("a", "b", "c", "d"):
    write(lru, sid, 8)
lru.get_cache(0, "b")
write(lru, "e", 5)
print("evicted:", [entry[1] for entry in lru.eviction_log])

# %% [markdown]
# <details><summary>Answer</summary>
#
# "a": now the least recently used, since it was written first and never read. LRU ranks by the
# last use, read or write, not by age alone; `ADAPTIVE` would rank by reads per block held.
# </details>
