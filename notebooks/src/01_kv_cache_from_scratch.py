# %% [markdown]
# # KV caching from scratch
#
# A language model writes text one token at a time: it reads the prompt, picks a next token,
# appends it and runs again. Run naively, every step re-reads the *whole* sequence so far, so
# step 500 does about 500 times the work of step 1. A **KV cache** removes the repeated part.
#
# In this notebook we
#
# 1. find exactly which work repeats from one step to the next;
# 2. see what a cache stores and how many bytes each token costs;
# 3. write a cached attention loop by hand and check it against full recomputation;
# 4. train a tiny Shakespeare model (seconds on a CPU) and check that the library's cached
#    `generate` gives *the same tokens and logits* as the cache-free reference;
# 5. measure what one decoding step costs, with and without the cache, as the text grows.

# %%
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

from kv_cache import DynamicKVCache
from transformer import DecoderOnlyTransformer, ModelConfig

torch.manual_seed(0)
# The models here are tiny: for matrices this small a second thread costs more in
# synchronisation than it saves, and one thread keeps the timings below steady.
torch.set_num_threads(1)
plt.rcParams.update({"figure.figsize": (6, 3.5), "figure.dpi": 80})

# %% [markdown]
# ## 1. What changes from one step to the next, and what doesn't
#
# In every attention layer, position $i$ turns its hidden state $h_i$ into a query $q_i$, a key
# $k_i$ and a value $v_i$. The newest position $t$ then mixes the values of all positions:
#
# $$\text{out}_t = \sum_{i \le t} \operatorname{softmax}_i\!\left(\frac{q_t \cdot k_i}{\sqrt{d}}\right) v_i$$
#
# Because of the causal mask, $h_i$ depends on tokens $0..i$ only. Appending a token therefore
# cannot change $h_i$, $k_i$ or $v_i$ of any old position: they come out the same as at the
# previous step. Let's check on a small random model: a forward hook catches the keys of its
# second layer for a 10-token prefix, then for the same prefix plus one token.

# %%
probe = DecoderOnlyTransformer(ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4)).eval()
d_model = probe.config.d_model

projections = []  # output of layer 1's fused q|k|v projection, one entry per forward pass
hook = probe.decoder.blocks[1].attn.qkv_proj.register_forward_hook(
    lambda module, inputs, output: projections.append(output[0]))
ids = torch.randint(0, 100, (1, 11))
with torch.no_grad():
    probe(ids[:, :10])   # step t:   10 tokens
    probe(ids)           # step t+1: the same 10 tokens and one more
hook.remove()

keys_before = projections[0][:, d_model:2 * d_model]   # q | k | v sit side by side
keys_after = projections[1][:, d_model:2 * d_model]
print("keys computed:", tuple(keys_before.shape), "then", tuple(keys_after.shape))
print("largest change of an old key:", (keys_after[:10] - keys_before).abs().max().item())

# %% [markdown]
# Only the key and value of the *new* position are new. Without a cache, step $t$ recomputes
# the $t$ old keys and values of every layer -- and all the other work on the old positions
# too, which nobody needs: later tokens see old positions **only through their keys and
# values**. Attention is the one place where positions talk to each other.
#
# So a decoding step only has to run the new token through the model, letting each layer read
# the old keys and values from storage. That storage is the KV cache.
#
# ## 2. What the cache stores
#
# Per layer, one key tensor and one value tensor of shape `(batch, n_kv_heads, seq_len,
# head_dim)`. `n_kv_heads` equals `n_heads` in ordinary multi-head attention and is smaller
# with grouped-query attention, where several query heads share one key/value head. Here is a
# `DynamicKVCache` after a forward pass over our 11 tokens:

# %%
cache = DynamicKVCache()
with torch.no_grad():
    probe(ids, cache=cache)
for layer in range(probe.config.n_layers):
    k, v = cache.get(layer)
    print(f"layer {layer}: keys {tuple(k.shape)}  values {tuple(v.shape)}")
print("tokens stored:", cache.get_seq_length())

# %% [markdown]
# ### Inside one cached step
#
# What does attention see when the cache is in use? Below, the first 10 tokens fill a cache
# (the *prefill*), then token 11 goes in alone. A subclass of `DynamicKVCache` remembers what
# layer 0's `update` receives and returns, and a hook on layer 0's attention module catches its
# query. The shapes follow the `(batch, heads, tokens, head_dim)` convention:

# %%
class RecordingCache(DynamicKVCache):
    """A DynamicKVCache that remembers layer 0's last `update`: the new key in, all keys/values out."""

    def update(self, key, value, layer_idx, *args, **kwargs):
        keys, values = super().update(key, value, layer_idx, *args, **kwargs)
        if layer_idx == 0:
            self.last = {"new key": key, "K": keys, "V": values}
        return keys, values


caught = {}
attention0 = probe.decoder.blocks[0].attn
hook = attention0.register_forward_pre_hook(  # the attention module's input x -> its queries
    lambda module, args: caught.update(q=module.project_qkv(args[0])[0].transpose(1, 2)))
cache = RecordingCache()
with torch.no_grad():
    probe(ids[:, :10], cache=cache)    # prefill: tokens 1..10
    probe(ids[:, 10:11], cache=cache)  # one cached step: token 11 only
hook.remove()

q, K, V = caught["q"], cache.last["K"], cache.last["V"]
scores = q @ K.transpose(-1, -2) / q.shape[-1] ** 0.5
print(f"q                     {tuple(q.shape)}   the new token's query, one per head")
print(f"new k (into update)   {tuple(cache.last['new key'].shape)}   the only key this step computes")
print(f"K, V (out of update)  {tuple(K.shape)}  10 read from the cache + 1 new")
print(f"scores = q K^T        {tuple(scores.shape)}  one row of the attention matrix per head")
print(f"softmax(scores) V     {tuple((scores.softmax(-1) @ V).shape)}   the output for the new token")
assert q.shape[2] == 1 and K.shape[2] == V.shape[2] == 11

# %% [markdown]
# Each token therefore costs
#
# $$\text{bytes per token} = 2 \times n_\text{layers} \times n_\text{kv heads} \times d_\text{head} \times \text{bytes per element}$$
#
# per sequence (the 2 counts keys and values). A `StaticKVCache` allocates exactly that for
# `max_cache_len` tokens up front, which lets us check the formula:

# %%
def kv_bytes_per_token(n_layers, n_kv_heads, head_dim, bytes_per_element=4):
    """Bytes of keys + values that one token adds to the cache (4 = float32, 2 = fp16/bf16)."""
    return 2 * n_layers * n_kv_heads * head_dim * bytes_per_element


cfg = probe.config
per_token = kv_bytes_per_token(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim)
static = probe.new_cache("static", batch_size=1, max_cache_len=100)
print(f"formula: {per_token} bytes/token x 100 tokens = {100 * per_token} bytes")
print(f"StaticKVCache(max_cache_len=100).memory_bytes() = {static.memory_bytes()} bytes")
assert static.memory_bytes() == 100 * per_token

# %% [markdown]
# The same formula for a few well-known shapes (fp16, 2 bytes per element) shows why the cache,
# not the weights, often decides how many sequences fit on a GPU -- and what grouped-query
# attention (8 key/value heads instead of 32) buys:

# %%
for name, layers, kv_heads, head_dim in [("GPT-2 small", 12, 12, 64), ("Llama-2-7B", 32, 32, 128),
                                         ("Llama-3-8B (GQA)", 32, 8, 128)]:
    b = kv_bytes_per_token(layers, kv_heads, head_dim, bytes_per_element=2)
    print(f"{name:17s} {b // 1024:4d} KiB per token, {b * 4096 / 2**30:4.2f} GiB for 4,096 tokens")

# %% [markdown]
# ## 3. Cached attention by hand
#
# One attention head with plain tensors, decoding 12 positions one at a time, three ways:
#
# * **without a cache**: step $t$ projects all positions $0..t$ to keys and values again;
# * **with a cache**: step $t$ projects position $t$ only and appends it to a list;
# * **all at once**, as training sees it: one causal `scaled_dot_product_attention`.
#
# The rows of `x` stand for the hidden states arriving at this layer, one per step.

# %%
d = 16
Wq, Wk, Wv = (torch.randn(d, d) / d ** 0.5 for _ in range(3))
x = torch.randn(12, d)


def attend(q, K, V):
    """One query (d,) over t keys and values (t, d) -> (d,)."""
    weights = torch.softmax(K @ q / d ** 0.5, dim=0)
    return weights @ V


# Without a cache: every step re-projects the whole prefix.
uncached, rows_uncached = [], 0
for t in range(len(x)):
    K, V = x[: t + 1] @ Wk, x[: t + 1] @ Wv
    rows_uncached += t + 1
    uncached.append(attend(x[t] @ Wq, K, V))

# With a cache: project the new position only, append it, attend over everything stored.
K_cache, V_cache, cached, rows_cached = [], [], [], 0
for t in range(len(x)):
    K_cache.append(x[t] @ Wk)
    V_cache.append(x[t] @ Wv)
    rows_cached += 1
    cached.append(attend(x[t] @ Wq, torch.stack(K_cache), torch.stack(V_cache)))

# All at once with a causal mask: what a training step computes.
full = F.scaled_dot_product_attention((x @ Wq)[None], (x @ Wk)[None], (x @ Wv)[None], is_causal=True)[0]

print("cached == uncached:          ", torch.allclose(torch.stack(cached), torch.stack(uncached), atol=1e-6))
print("cached == causal attention:  ", torch.allclose(torch.stack(cached), full, atol=1e-6))
print(f"rows projected to keys/values: {rows_uncached} without a cache, {rows_cached} with one")

# %% [markdown]
# The toy's uncached loop already asks for one query row only. A model run without a cache
# does worse: it is a training-style forward over the whole prefix, so at step $t$ it computes
# the query of *every* position against every earlier key -- the whole lower triangle of the
# attention matrix -- and then keeps only the last row's prediction. The cached step computes
# that last row and nothing else. Here is the step that handles token 12 of the loop above (the
# strip below each matrix: which keys and values the step has to project):

# %%
n = len(x)
NOT_COMPUTED, THROWN_AWAY, USED, READ = 0, 1, 2, 3
colours = ListedColormap(["white", "#f6c89f", "#d9534f", "#9ecae1"])
uncached_scores = torch.tril(torch.full((n, n), THROWN_AWAY))
uncached_scores[-1] = USED
cached_scores = torch.full((n, n), NOT_COMPUTED)
cached_scores[-1] = USED
projected = {"uncached": torch.full((1, n), USED), "cached": torch.tensor([[READ] * (n - 1) + [USED]])}

fig, axes = plt.subplots(2, 2, figsize=(9, 5.6), gridspec_kw={"height_ratios": [n, 1]}, sharex=True)
for col, (name, grid) in enumerate([("uncached", uncached_scores), ("cached", cached_scores)]):
    computed = int((grid != NOT_COMPUTED).sum())
    axes[0, col].imshow(grid, cmap=colours, vmin=0, vmax=3, aspect="auto")
    axes[0, col].set_title(f"{name}, token {n}: {computed} attention scores", fontsize=10)
    axes[0, col].set_ylabel("query position")
    axes[0, col].set_yticks(range(0, n, 2))
    axes[0, col].set_yticks([i - 0.5 for i in range(n + 1)], minor=True)
    axes[1, col].imshow(projected[name], cmap=colours, vmin=0, vmax=3, aspect="auto")
    axes[1, col].set_yticks([0], ["K, V"])
    axes[1, col].set_xlabel("key position")
for ax in axes.flat:
    ax.set_xticks(range(0, n, 2))
    ax.set_xticks([i - 0.5 for i in range(n + 1)], minor=True)
    ax.grid(which="minor", color="0.8", lw=0.5)
    ax.tick_params(which="minor", length=0)
patches = [Patch(facecolor=c, edgecolor="0.5", label=l) for c, l in
           [("#d9534f", "computed this step, needed"), ("#f6c89f", "computed this step, thrown away"),
            ("#9ecae1", "read from the cache"), ("white", "not computed")]]
fig.legend(handles=patches, loc="lower center", ncol=4, fontsize=8, frameon=False)
fig.tight_layout(rect=(0, 0.06, 1, 1))
plt.show()
print(f"token {n}: uncached {n * (n + 1) // 2} scores and {n} key/value projections, "
      f"cached {n} scores and 1 key/value projection")

# %% [markdown]
# For $n$ steps the uncached loop projects $1 + 2 + \dots + n = n(n+1)/2$ rows, the cached one
# $n$. The attention read is the same in both: step $t$ still looks at $t$ keys, so even a
# cached step gets a little dearer as the text grows -- but it is a read of stored vectors, not
# a rerun of the network.
#
# One shortcut of the toy: `torch.stack(K_cache)` copies the whole history at every step,
# which is $O(t)$ again. The library's `DynamicKVCache` (`kv_cache/basic/dynamic.py`) writes into a
# buffer with spare room and doubles it when full, so an append costs $O(1)$ on average;
# `StaticKVCache` (`kv_cache/basic/static.py`) allocates the maximum length once.
#
# ## 4. A tiny Shakespeare model
#
# To test the real thing we want a model whose predictions mean something. We train a small
# SentencePiece tokenizer (512 pieces) on *Hamlet* and a 2-layer, 64-wide decoder with rotary
# position embeddings for 400 steps of 32 windows of 64 tokens. It will not write Shakespeare,
# but it learns the shape of a play: speaker names, short lines, common words.

# %%
from transformer.data import load_corpus
from transformer.tokenizer import Tokenizer

hamlet = next(doc.text for doc in load_corpus() if doc.name == "hamlet")
tok = Tokenizer.train(hamlet, vocab_size=512)
data = torch.tensor(tok.encode(hamlet))
print(f"{len(hamlet):,} characters -> {len(data):,} tokens ({len(hamlet) / len(data):.1f} characters per token)")
print(hamlet[20005:20150])

# %%
config = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, max_seq_len=512,
                     pos_encoding="rope")
model = DecoderOnlyTransformer(config)
optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
batches = torch.Generator().manual_seed(0)
steps, batch_size, block = 400, 32, 64

start = time.perf_counter()
for step in range(steps):
    offsets = torch.randint(0, len(data) - block - 1, (batch_size,), generator=batches)
    inputs = torch.stack([data[o: o + block] for o in offsets])
    targets = torch.stack([data[o + 1: o + block + 1] for o in offsets])  # the next token everywhere
    loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 100 == 0 or step == steps - 1:
        print(f"step {step:3d}  loss {loss.item():.2f}")
print(f"trained {model.num_parameters():,} parameters in {time.perf_counter() - start:.0f} s")
model.eval();

# %% [markdown]
# ## 5. Cached and uncached generation agree
#
# `model.generate(..., use_cache=False)` is the reference: at every step it runs the model over
# the whole sequence so far. With `use_cache=True` it runs the prompt once to fill a cache
# ("prefill"), then feeds one token per step. `output_logits=True` also returns the raw logits
# each token was chosen from, so we can compare the runs number by number, for both cache
# implementations:

# %%
prompt = torch.tensor([tok.encode("HAMLET:\n")])
reference = model.generate(prompt, max_new_tokens=100, use_cache=False, output_logits=True)
for implementation in ("dynamic", "static"):
    out = model.generate(prompt, max_new_tokens=100, use_cache=True, cache_implementation=implementation,
                         output_logits=True)
    same_tokens = torch.equal(out.sequences, reference.sequences)
    max_diff = (out.logits - reference.logits).abs().max().item()
    print(f"{implementation:7s} cache: greedy tokens identical: {same_tokens}, largest logit difference {max_diff:.1e}")
    assert same_tokens and torch.allclose(out.logits, reference.logits, atol=1e-4)
print("EQUIVALENCE CHECK PASSED")

# %% [markdown]
# The logits agree to about $10^{-6}$, not exactly: a cached step multiplies matrices of other
# shapes than the full pass, so floating-point sums are added in another order. That is why
# the check compares logits with `allclose` and tokens exactly.
#
# Greedy decoding of a small model soon repeats itself; sampling (notebook 02) reads better:

# %%
print("--- greedy ---")
print(tok.decode(reference.sequences[0].tolist())[:200])
sample = model.generate(prompt, max_new_tokens=100, do_sample=True, temperature=0.8, top_k=50,
                        generator=torch.Generator().manual_seed(1))
print("--- sampled: temperature 0.8, top-k 50 ---")
print(tok.decode(sample[0].tolist()))

# %% [markdown]
# ## 6. The cost curve
#
# What does one step cost when the context holds $L$ tokens?
#
# * **uncached**: a forward pass over all $L$ tokens (asking for the last position's logits only);
# * **cached**: a forward pass over one token, with the other $L-1$ in the cache.
#
# To time the cached step repeatedly at the same length we `rollback` the cache back to $L-1$
# tokens after each step, which costs nothing: it only moves the stored length.

# %%
def median_seconds(fn, repeats=9):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


lengths = [16, 64, 128, 256, 384, 512]
text_ids = data[: max(lengths)][None]
step_time = {"uncached": [], "cached": []}
with torch.no_grad():
    for L in lengths:
        step_time["uncached"].append(median_seconds(lambda: model(text_ids[:, :L], num_logits_to_keep=1)))
        cache = DynamicKVCache()
        model(text_ids[:, : L - 1], cache=cache)        # prefill L-1 tokens

        def cached_step():
            model(text_ids[:, L - 1: L], cache=cache)   # token number L
            cache.rollback(L - 1)                           # and forget it again

        step_time["cached"].append(median_seconds(cached_step))

plt.plot(lengths, [t * 1e3 for t in step_time["uncached"]], "o-", label="uncached: rerun all L tokens")
plt.plot(lengths, [t * 1e3 for t in step_time["cached"]], "o-", label="cached: one token, read the cache")
plt.xlabel("tokens in the context (L)")
plt.ylabel("time of one step (ms)")
plt.ylim(bottom=0)
plt.title("Cost of one decoding step, tiny model, 1 CPU thread")
plt.grid(alpha=0.3)
plt.legend()
plt.show()
for L, u, c in zip(lengths, step_time["uncached"], step_time["cached"]):
    print(f"L = {L:3d}: uncached {u * 1e3:5.2f} ms, cached {c * 1e3:4.2f} ms ({u / c:4.1f}x)")

# %% [markdown]
# The uncached step grows with $L$ (its projections and MLPs linearly, its attention
# quadratically), so generating $n$ tokens costs $O(n^2)$ work in all. The cached step is
# nearly flat for a model this small: reading $L$ stored keys is cheap next to the fixed cost of
# pushing one token through the layers. The bigger the model and the longer the text, the
# bigger the gap; `python -m benchmarks.kv_cache_demo` times whole generations.
#
# ## Summary
#
# * Under a causal mask the keys and values of old positions never change, and they are all a
#   later token reads from them. Store them once: that is the KV cache.
# * It costs $2 \times n_\text{layers} \times n_\text{kv heads} \times d_\text{head} \times$
#   bytes per element, per token and per sequence.
# * The cache-free pass is the oracle: cached generation reproduces its tokens exactly and its
#   logits up to float rounding.
#
# Next: `02_sampling.ipynb` (how a token is chosen from the logits) and
# `03_encoder_decoder_cross_attention.ipynb` (the second cache of an encoder-decoder model).
#
# ## Exercises: predict, then run
#
# Write your prediction down before you run each cell; the answer is folded below it.
#
# **1.** A batch of 3 prompts of 8 tokens each goes into `generate` with 5 new tokens and a
# `DynamicKVCache` of our own. What is the shape of layer 0's keys in that cache afterwards?
# (The Shakespeare model has 4 heads of 16.)

# %% tags=["exercise"]
my_cache = DynamicKVCache()
prompts = data[:24].view(3, 8)
out = model.generate(prompts, max_new_tokens=5, cache_implementation=my_cache, eos_token_id=None)
print("sequences:", tuple(out.shape), "| layer 0 keys in the cache:", tuple(my_cache.get(0)[0].shape))

# %% [markdown]
# <details><summary>Answer</summary>
#
# `(3, 4, 12, 16)`: batch 3, 4 heads, **12** tokens, head size 16 -- not 13. The prompt's 8
# tokens go in with the prefill, and each of the next 4 steps feeds the token chosen before it.
# The 5th new token is chosen from the last step's logits and returned, but never fed back, so
# its key and value are never computed. The cache always runs one token behind the text.
# </details>
#
# **2.** Give the small `probe` model *multi-query* attention (`n_kv_heads=1`: its 4 query heads
# share one key/value head). How many bytes does a `StaticKVCache` for 100 tokens take now?
# It took 51,200 bytes with 4 key/value heads.

# %% tags=["exercise"]
mqa = DecoderOnlyTransformer(ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1))
print(mqa.new_cache("static", batch_size=1, max_cache_len=100).memory_bytes(), "bytes")

# %% [markdown]
# <details><summary>Answer</summary>
#
# 12,800 bytes, a quarter: $2 \times 2$ layers $\times 1$ head $\times 8$ dims $\times 4$ bytes
# $= 128$ bytes per token. The cache stores key/value heads only; the number of query heads does
# not enter the formula. (The model's outputs change too -- fewer heads of keys and values is a
# different model, which is why GQA models are trained that way.)
# </details>
#
# **3.** Sample 100 tokens with the same seed twice: once with the cache, once without. Same text?

# %% tags=["exercise"]
runs = [model.generate(prompt, max_new_tokens=100, do_sample=True, temperature=0.8, top_k=50, use_cache=use,
                       generator=torch.Generator().manual_seed(1)) for use in (True, False)]
print("same tokens:", torch.equal(*runs))

# %% [markdown]
# <details><summary>Answer</summary>
#
# The same tokens. Both runs compute the same logits (up to a rounding difference of about
# $10^{-6}$) and draw from the generator in the same order, one draw per step, so every draw
# lands on the same token. The cache changes the cost, not the distribution -- and with a shared
# seed, not even the draws. Only a draw that falls within $10^{-6}$ of a boundary between two
# tokens could differ, which is why the checks compare logits with a tolerance.
# </details>
