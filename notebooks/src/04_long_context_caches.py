# %% [markdown]
# # Long-context caches: windows, attention sinks, importance and quantization
#
# A KV cache makes each decoding step cheap, but it keeps **every** token. Two things then go
# wrong on long streams:
#
# 1. **memory and time grow with the stream**: token $t$ stores its keys and values forever and
#    every later step reads all $t$ of them;
# 2. **the model leaves its training context**: a model trained on 256 tokens has never seen a
#    query 5,000 positions away from a key, and its predictions fall apart.
#
# This notebook looks at four caches from `kv_cache` that attack these problems:
#
# | cache | keeps | memory |
# |---|---|---|
# | `SlidingWindowKVCache(window)` | the last `window` tokens | fixed |
# | `SinkKVCache(num_sink_tokens, window)` | the first few tokens + the last `window` (StreamingLLM) | fixed |
# | `LinearKVCache(keep_window_size)` | the most *important* tokens (a per-token score) | fixed |
# | `QuantizedKVCache(nbits)` | every token, in 8, 4 or 2 bits (recent ones exact) | 3-11x smaller, still growing |
#
# We will measure their memory, draw what each one keeps over time, check the exact ones
# against references, and read a play far past a tiny model's training context.

# %%
import math
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from kv_cache import (DynamicKVCache, LinearKVCache, QuantizedKVCache, SinkKVCache, SlidingWindowKVCache,
                      dequantize, quantize)
from transformer import DecoderOnlyTransformer, ModelConfig

torch.manual_seed(0)
torch.set_num_threads(1)  # tiny tensors: one thread is steadier (and no slower)
plt.rcParams.update({"figure.figsize": (6, 3.5), "figure.dpi": 80})

# %% [markdown]
# ## 1. Memory as the stream grows
#
# A layer stores keys and values of shape `(batch, kv_heads, tokens, head_dim)`. We feed 4,096
# tokens of random keys/values for a 4-layer model with 8 heads of 64 into each cache and record
# `memory_bytes()` -- the bytes the cache really holds, packed 4-bit codes included.

# %%
layers, heads, head_dim, window = 4, 8, 64, 512
caches = {
    "dynamic (full)": DynamicKVCache(),
    "sliding window 512": SlidingWindowKVCache(window),
    "sinks 4 + 508": SinkKVCache(4, window - 4),
    "quantized 8-bit": QuantizedKVCache(nbits=8, group_size=32, residual_length=32),
    "quantized 4-bit": QuantizedKVCache(nbits=4, group_size=32, residual_length=32),
}
checkpoints = list(range(256, 4097, 256))
memory = {name: [] for name in caches}
for name, cache in caches.items():
    for t in checkpoints:
        for layer in range(layers):
            k, v = torch.randn(1, heads, 256, head_dim), torch.randn(1, heads, 256, head_dim)
            cache.update(k, v, layer)
        memory[name].append(cache.memory_bytes() / 2**20)

for name, values in memory.items():
    plt.plot(checkpoints, values, label=name, ls="--" if name.startswith("sinks") else "-")  # sinks == window
plt.xlabel("tokens in the stream")
plt.ylabel("cache memory (MiB)")
plt.title("4 layers x 8 heads x 64, float32")
plt.legend(fontsize=8)
plt.grid(alpha=0.3)
plt.show()
for name, values in memory.items():
    print(f"{name:20s} {values[0]:6.2f} MiB at 256 tokens, {values[-1]:6.2f} MiB at 4,096")
assert memory["sliding window 512"][1] == memory["sliding window 512"][-1]  # flat once the window is full
assert memory["quantized 4-bit"][-1] < memory["quantized 8-bit"][-1] < memory["dynamic (full)"][-1] / 3

# %% [markdown]
# The dynamic cache grows in steps (it doubles its buffer when full). The window and sink caches
# allocate their whole window at the first update and never grow again. The quantized caches grow at a quarter (8-bit) or an eighth
# (4-bit) of the rate, plus a little for the per-group scales.
#
# ## 2. What each policy keeps
#
# Run 50 single-token steps through three bounded caches and paint, for every step (row), the
# positions the cache holds (columns). `LinearKVCache` keeps the 12 tokens with the highest
# importance score; here the score is random, fixed per token, as in dynamic-mask attention.

# %%
steps, keep = 50, 12
policies = {"SlidingWindowKVCache(12)": SlidingWindowKVCache(keep), "SinkKVCache(3, 9)": SinkKVCache(3, keep - 3),
            "LinearKVCache(12)": LinearKVCache(keep)}
importance = torch.rand(steps)
kept = {name: torch.zeros(steps, steps) for name in policies}
for name, cache in policies.items():
    for t in range(steps):
        x = torch.randn(1, 1, 1, 4)
        if isinstance(cache, LinearKVCache):
            cache.update(x, x, 0, importance=importance[t].view(1, 1, 1))
            held = cache.key_positions(0)[0, 0]
        else:
            cache.update(x, x, 0)
            held = cache.stored_positions(0)
        kept[name][t, held] = 1

fig, axes = plt.subplots(1, 3, figsize=(12, 4), sharey=True)
for ax, (name, grid) in zip(axes, kept.items()):
    ax.imshow(grid, cmap="Greys", aspect="auto", interpolation="nearest")
    ax.set(title=name, xlabel="token position")
axes[0].set_ylabel("decoding step")
plt.show()

window_rows = [set(torch.nonzero(row).flatten().tolist()) for row in kept["SlidingWindowKVCache(12)"]]
sink_rows = [set(torch.nonzero(row).flatten().tolist()) for row in kept["SinkKVCache(3, 9)"]]
linear_rows = [set(torch.nonzero(row).flatten().tolist()) for row in kept["LinearKVCache(12)"]]
assert all(r == set(range(max(0, t - 11), t + 1)) for t, r in enumerate(window_rows))
assert all(r == set(range(min(3, t + 1))) | set(range(max(0, t - 8), t + 1)) for t, r in enumerate(sink_rows))
assert all(len(linear_rows[t] - linear_rows[t - 1]) <= 1 for t in range(1, steps))  # at most one swap per step
top = set(importance.topk(keep).indices.tolist())
print("LinearKVCache ends with the 12 most important tokens:", linear_rows[-1] == top)
assert linear_rows[-1] == top

# %% [markdown]
# The window is a diagonal band. The sink cache is the same band plus three columns that never
# leave: the *attention sinks*. The importance cache keeps a scattered set; once a token drops
# out it never returns -- its importance does not change, and a newer, more important token
# will always beat it -- so keeping the current top 12 is enough to be *exactly* equal to
# attention over the top 12 of everything seen (`tests/test_long_context_linear.py` checks this
# against brute force).
#
# ## 3. Positions: why StreamingLLM renumbers
#
# With rotary embeddings (RoPE) the attention score of query $q$ and key $k$ depends on their
# distance. A model trained on 32 tokens has only seen distances 0..31. If the sink tokens kept
# their absolute positions, the query at position 5,000 would look at a key 5,000 positions away.
# StreamingLLM instead gives the kept tokens their positions **inside the cache**. Because RoPE
# is relative, that costs almost nothing: sliding every window key down by the number of dropped
# tokens and the query with them changes no distance, so window keys stay rotated once, at their
# absolute position. Only the sinks must come closer: `SinkKVCache.rotary_offsets` says by how
# much, and the model rotates those few keys (not the whole window) after each update:

# %%
sinks = policies["SinkKVCache(3, 9)"]
absolute = sinks.key_positions(0)
print("storage order, absolute positions:", absolute.tolist())
print("same keys, positions in the cache:", sinks.key_positions(0, in_cache=True).tolist())
print("new query: absolute position", steps - 1, "-> in-cache position", sinks.get_max_cache_shape() - 1)
print("rotation the 3 sink keys still owe:", sinks.rotary_offsets(0).tolist(), "= tokens dropped:",
      steps - sinks.get_max_cache_shape())

# %% [markdown]
# The ring buffer is stored in ring order (a decoding step overwrites one slot, no shifting); the
# positions say which token sits where, and the model builds its mask and its rotations from them.
#
# ## 4. The exact case: a model trained with a sliding window
#
# If the model itself attends to the last `sliding_window` tokens only (`ModelConfig.sliding_window`,
# Mistral-style), a sliding-window cache loses nothing. Cached generation must give the logits of
# the uncached windowed model -- also for a prompt longer than the window, which the cache handles
# by returning the old kept tokens plus the whole prompt once, and only then truncating.

# %%
windowed = DecoderOnlyTransformer(ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                              max_seq_len=128, pos_encoding="rope", sliding_window=8)).eval()
prompt = torch.randint(0, 61, (1, 20))  # longer than the window
cached = windowed.generate(prompt, 40, cache_implementation="sliding_window", output_logits=True, eos_token_id=None)
uncached = windowed.generate(prompt, 40, use_cache=False, output_logits=True, eos_token_id=None)
same = torch.allclose(cached.logits, uncached.logits, atol=1e-5)
print("sliding window cache == uncached windowed model:", same)
assert same and torch.equal(cached.sequences, uncached.sequences)

# %% [markdown]
# ## 5. Reading far past the training context
#
# Now a real (tiny) language model: a SentencePiece tokenizer and a 2-layer RoPE decoder
# trained on *Hamlet* with a context of only **32 tokens**, for a few seconds. We then read the
# first 16 x 32 = 512 tokens of *Macbeth* -- text it never saw -- one token at a time, and score
# each next token through three caches:
#
# * `dense`: a full `DynamicKVCache` -- the model must handle distances up to 511;
# * `sliding window`: the last 32 tokens, at their absolute positions (distances < 32);
# * `sinks`: 4 sink tokens + the last 28, positions inside the cache (distances < 32).

# %%
from transformer.data import load_corpus
from transformer.tokenizer import Tokenizer

plays = {doc.name: doc.text for doc in load_corpus()}
tok = Tokenizer.train(plays["hamlet"], vocab_size=512)
train = torch.tensor(tok.encode(plays["hamlet"]))
context = 32
model = DecoderOnlyTransformer(ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4,
                                           max_seq_len=context, pos_encoding="rope"))
optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
batches = torch.Generator().manual_seed(0)
start = time.perf_counter()
for step in range(250):
    offsets = torch.randint(0, len(train) - context - 1, (32,), generator=batches)
    inputs = torch.stack([train[o:o + context] for o in offsets])
    targets = torch.stack([train[o + 1:o + context + 1] for o in offsets])
    loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
print(f"trained for {time.perf_counter() - start:.0f} s, final loss {loss.item():.2f}")
model.eval();

# %%
stream = torch.tensor(tok.encode(plays["macbeth"]))[:16 * context + 1]


@torch.inference_mode()
def streaming_nll(cache):
    """Negative log-likelihood of every next token, reading `stream` one token at a time."""
    logits = torch.cat([model(stream[None, t:t + 1], cache=cache)[0] for t in range(len(stream) - 1)])
    return F.cross_entropy(logits, stream[1:], reduction="none")


nll = {"dense": streaming_nll(DynamicKVCache()),
       "sliding window": streaming_nll(SlidingWindowKVCache(context)),
       "sinks": streaming_nll(SinkKVCache(4, context - 4))}

print("perplexity of the first n tokens of Macbeth")
print(f"{'n':>5s} " + " ".join(f"{name:>15s}" for name in nll))
for multiple in (1, 4, 16):
    n = multiple * context
    print(f"{n:5d} " + " ".join(f"{math.exp(v[:n].mean()):15.1f}" for v in nll.values()))
for name, v in nll.items():
    smooth = v.unfold(0, context, context // 2).mean(-1)
    plt.plot((torch.arange(len(smooth)) * context // 2 + context // 2) / context, smooth, label=name)
plt.axvline(1, color="grey", ls=":", lw=1)
plt.xlabel("position / training context")
plt.ylabel("NLL (nats, mean over 32 tokens)")
plt.title("A model trained on 32 tokens reads 512")
plt.legend()
plt.show()
ppl16 = {name: math.exp(v.mean()) for name, v in nll.items()}
assert ppl16["dense"] > 1.2 * max(ppl16["sliding window"], ppl16["sinks"])  # RoPE far past its context fails
assert torch.allclose(nll["dense"][:context], nll["sinks"][:context], atol=1e-4)  # identical inside the context

# %% [markdown]
# Inside the training context (left of the dotted line) all three are the same model. Past it,
# the dense cache shows the model distances it has never seen and the loss climbs. Both bounded
# caches keep every distance below 32, so they stay at their in-context level for as long as the
# stream runs, in constant memory. StreamingLLM's extra finding -- that dropping the *first*
# tokens hurts because large models use them as attention sinks -- needs models that have
# learned such sinks: on this tiny model the window and the sink cache score about the same;
# `benchmarks/long_context_benchmark.py --checkpoint out` measures the default model.
#
# ## 6. Quantized keys and values
#
# `QuantizedKVCache` keeps every token but in few bits: each head vector is cut into groups of
# `group_size` numbers; a group stores its minimum and step in float16 and each number as an
# integer code, so the error is at most half a step. The newest tokens stay exact: after a
# prompt exactly `residual_length` of them; while decoding token by token the exact window fills
# up to `residual_length` and is then cut back to its newest half in one quantization call
# (batching the small quantize operations, as `transformers`' `QuantizedCache` does). First on
# random numbers, then inside the model: the 512 Macbeth tokens from above, as 16 windows of 32
# read token by token (one batch of 16 rows) through a quantized cache, against
# the model without a cache. The top-1 token can only change where the uncached model's two
# best logits are closer together than the errors, so we also print that gap (the *margin*).

# %%
x = torch.randn(4, 64)
for nbits in (8, 4, 2):
    packed, step, minimum = quantize(x, nbits, group_size=32)
    err = (x - dequantize(packed, step, minimum, nbits)).abs()
    assert bool((err <= step.float().repeat_interleave(32, -1) / 2 + 1e-6).all())
    print(f"{nbits}-bit: {packed.numel() + 2 * step.numel() * 2:4d} bytes for 256 floats ({256 * 4} bytes), "
          f"largest error {err.max():.4f}")

windows = stream[:16 * context].view(16, context)
with torch.inference_mode():
    reference = model(windows)  # (16, 32, vocab), no cache
best_two = reference.topk(2, dim=-1).values
margin = best_two[..., 0] - best_two[..., 1]  # how far the top token is ahead of the runner-up
print(f"reference: {margin.numel()} positions, median margin top-1 vs top-2 {margin.median():.4f}")
flips, errors, widest_flip = {}, {}, {}
for nbits in (8, 4, 2):
    cache = QuantizedKVCache(nbits=nbits, group_size=16, residual_length=4)
    with torch.inference_mode():
        got = torch.cat([model(windows[:, t:t + 1], cache=cache) for t in range(context)], dim=1)
    error = (got - reference).abs().max().item()
    flipped = got.argmax(-1) != reference.argmax(-1)
    flips[nbits], errors[nbits] = int(flipped.sum()), error
    widest_flip[nbits] = margin[flipped].max().item() if flipped.any() else 0.0
    widest = f"largest margin among them {margin[flipped].max():.4f}" if flipped.any() else "none"
    print(f"{nbits}-bit cache: largest logit error {error:.3f}, top-1 token changed at {flips[nbits]:3d} of "
          f"{flipped.numel()} positions ({widest})")
    # A flip needs the errors of the two logits to close the gap: margin < 2 x largest error.
    assert not flipped.any() or margin[flipped].max() < 2 * error
assert errors[8] < errors[4] < errors[2] and flips[8] <= flips[4] <= flips[2] and flips[4] < 0.05 * margin.numel()
assert max(widest_flip[8], widest_flip[4]) < margin.median() < errors[2]  # what the text below says
print("LONG CONTEXT CHECKS PASSED")

# %% [markdown]
# Fewer bits, larger errors: the quantization step grows from $1/255$ of a group's range (8
# bits) to $1/15$ (4 bits) and $1/3$ (2 bits), and the printed logit errors grow with it. The
# top token is more robust than the error suggests: it changes only where the model was
# undecided. With 8 and 4 bits the printed margins at the flipped positions sit far below the
# median margin, and flips are rare; at 2 bits the error is larger than a typical margin, and
# flips are no longer rare. Top-1 agreement is a coarse measure, though: the probabilities of
# *every* token move with the error, which perplexity sees. The measured memory saving, logit error and perplexity
# change on the default model, and what the dequantization costs in speed, are in the README's
# long-context section (`python -m benchmarks.long_context_benchmark`, run from a clone of
# the repository).
#
# ## Exercises: predict, then run
#
# Write your prediction down before you run each cell; the answer is folded below it.
#
# **1.** Feed 100 tokens, one per step, into `SinkKVCache(3, 9)`. Which absolute positions
# does it hold at the end?

# %% tags=["exercise"]
sink_cache = SinkKVCache(3, 9)
for t in range(100):
    x = torch.randn(1, 1, 1, 4)
    sink_cache.update(x, x, 0)
print(sorted(sink_cache.stored_positions(0).tolist()))

# %% [markdown]
# <details><summary>Answer</summary>
#
# `[0, 1, 2, 91, 92, ..., 99]`: the 3 sinks never leave, and the window holds the 9 newest
# tokens. Its memory is the same as after 12 tokens -- and as after a million.
# </details>
#
# **2.** Give `LinearKVCache(12)` an importance score that grows with the position (newer =
# more important). What does it keep after 50 steps?

# %% tags=["exercise"]
linear = LinearKVCache(12)
for t in range(50):
    x = torch.randn(1, 1, 1, 4)
    linear.update(x, x, 0, importance=torch.tensor(float(t)).view(1, 1, 1))
print(sorted(linear.key_positions(0)[0, 0].tolist()))

# %% [markdown]
# <details><summary>Answer</summary>
#
# Positions 38 to 49, the 12 newest: with importance = recency, "keep the most important" *is*
# a sliding window. The policies differ only in the score they rank tokens by.
# </details>
#
# **3.** In section 1, 4-bit storage took 10.5 MiB at 4,096 tokens. How much does 2-bit take?

# %% tags=["exercise"]
two_bit = QuantizedKVCache(nbits=2, group_size=32, residual_length=32)
for _ in range(4096 // 256):
    for layer in range(layers):
        k, v = torch.randn(1, heads, 256, head_dim), torch.randn(1, heads, 256, head_dim)
        two_bit.update(k, v, layer)
print(f"2-bit: {two_bit.memory_bytes() / 2**20:.2f} MiB, 4-bit: {memory['quantized 4-bit'][-1]:.2f} MiB")

# %% [markdown]
# <details><summary>Answer</summary>
#
# About 6.5 MiB: more than half of 4-bit's 10.5. The codes halve (2 bits instead of 4 per
# number), but each group of 32 numbers still stores its minimum and step in float16 (4 bytes
# per 32 numbers, the same at every bit width), and the newest 32 tokens stay in float32.
# Below some bit width, the overhead is the memory.
# </details>
