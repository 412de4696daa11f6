# %% [markdown]
# # Encoder-decoder: one cache that grows, one that doesn't
#
# A decoder layer of an encoder-decoder model (the original Transformer, T5, Whisper, Marian
# translation models) has two attentions, and they need two different caches:
#
# * **self-attention** over the target tokens generated so far. It grows by one token per
#   step, exactly like a GPT's cache.
# * **cross-attention** over the encoder's output, the *memory*. Its keys and values are
#   projections of the memory, and the memory does not change while we decode. So they can be
#   computed **once**, on the first step, and reused on every later step.
#
# `kv_cache.EncoderDecoderCache` holds both halves. We train a small model to reverse
# sequences, then watch both caches step by step, count the projections each step runs, and
# look at what the cross-attention reads from its cache.

# %%
import time
from collections import Counter

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from kv_cache import EncoderDecoderCache
from transformer import EnhancedTransformer
from transformer.data import BOS_ID, EOS_ID, PAD_ID, exact_match, make_seq2seq_batch

torch.manual_seed(0)
# A tiny model: one thread is faster than two for matrices this small.
torch.set_num_threads(1)
plt.rcParams.update({"figure.figsize": (6, 3.2), "figure.dpi": 80})

# %% [markdown]
# ## The task: reverse a sequence
#
# `make_seq2seq_batch("reverse", ...)` draws random symbol sequences (ids 3 to 15) of 1 to 8
# symbols. The source ends with EOS; the decoder input starts with BOS (teacher forcing) and
# the target ends with EOS. Padding is id 0.

# %%
VOCAB, MAX_LEN = 16, 8
example = make_seq2seq_batch("reverse", 2, torch.Generator().manual_seed(0), min_len=3, max_len=MAX_LEN,
                             vocab_size=VOCAB)
for field in ("src", "tgt_in", "tgt_out"):
    print(f"{field:8s}", getattr(example, field).tolist())

# %% [markdown]
# ## Train for a few seconds
#
# `EnhancedTransformer` is the encoder-decoder model with the constructor of the classic KV-cache
# tutorial: vocabularies, `d_model`, `num_heads`, `d_ff`, `num_layers`. Its forward pass is the
# training pass -- the whole target at once under a causal mask, no cache -- and it masks source
# padding by itself.

# %%
model = EnhancedTransformer(src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, d_model=64, num_heads=4, d_ff=256,
                            num_layers=2, max_seq_len=32, dropout=0.0)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
problems = torch.Generator().manual_seed(0)

start = time.perf_counter()
for step in range(400):
    batch = make_seq2seq_batch("reverse", 64, problems, min_len=1, max_len=MAX_LEN, vocab_size=VOCAB)
    logits = model(batch.src, batch.tgt_in)
    loss = F.cross_entropy(logits.flatten(0, 1), batch.tgt_out.flatten(), ignore_index=PAD_ID)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 100 == 0 or step == 399:
        print(f"step {step:3d}  loss {loss.item():.3f}")
print(f"trained {sum(p.numel() for p in model.parameters()):,} parameters in {time.perf_counter() - start:.0f} s")
model.eval();

# %% [markdown]
# Greedy decoding (`temperature=0`) on 500 fresh problems. `max_length` counts the BOS token.

# %%
test = make_seq2seq_batch("reverse", 500, torch.Generator().manual_seed(1234), min_len=1, max_len=MAX_LEN,
                          vocab_size=VOCAB)
predicted = model.generate(test.src, max_length=MAX_LEN + 2, temperature=0)
print(f"exact match on 500 new problems: {exact_match(predicted[:, 1:], test.tgt_out):.1%}")
for i in range(3):
    print("source", test.src[i].tolist(), "-> output", predicted[i, 1:].tolist())

# %% [markdown]
# ## Inside the two caches, step by step
#
# We now run the decoding loop by hand with an `EncoderDecoderCache` and count what each step
# computes, with forward hooks on the decoder's projections:
#
# * `cross_attn.kv_proj` -- the cross-attention key/value projection of the memory (one call
#   per decoder layer when it runs);
# * `attn.qkv_proj` -- the self-attention projection; we count the *rows* (tokens) it projects.
#
# `cache.get_seq_length()` is the self-attention length (decoder tokens stored) and
# `cache.get_cross_seq_length()` the cross-attention length (source tokens stored).

# %%
counts = Counter()


def count_cross_kv(module, inputs, output):
    counts["cross kv_proj calls"] += 1


def count_self_rows(module, inputs, output):
    counts["self-attention rows"] += output.shape[0] * output.shape[1]


hooks = []
for block in model.decoder.blocks:
    hooks.append(block.cross_attn.kv_proj.register_forward_hook(count_cross_kv))
    hooks.append(block.attn.qkv_proj.register_forward_hook(count_self_rows))

src, src_mask = test.src[:1], test.src_mask[:1]
print("source:", src[0].tolist(), f"({int(src_mask.sum())} tokens)")
memory = model.encode(src, src_mask)  # the encoder runs once per source, with or without a cache


def decode_step(tokens, cache):
    """Logits of the next token; with a cache only the newest token goes in."""
    new = tokens[:, -1:] if cache is not None else tokens
    return model.decode(new, memory, src_mask=src_mask, cache=cache, num_logits_to_keep=1)[:, -1]


def decode_by_hand(cache):
    """Greedy decoding until EOS; prints the table and returns (tokens, per-step counts,
    per-step (self, cross) cache lengths)."""
    tokens, per_step, lengths = torch.tensor([[BOS_ID]]), [], []
    print("                           summed over both layers:")
    print("step  token  self len  cross len  cross kv_proj calls  self-attention rows")
    with torch.no_grad():
        for step in range(MAX_LEN + 1):
            counts.clear()
            next_token = decode_step(tokens, cache).argmax(-1, keepdim=True)
            per_step.append((counts["cross kv_proj calls"], counts["self-attention rows"]))
            tokens = torch.cat([tokens, next_token], dim=1)
            self_len = cache.get_seq_length() if cache is not None else "-"
            cross_len = cache.get_cross_seq_length() if cache is not None else "-"
            lengths.append((self_len, cross_len))
            print(f"{step:4d}  {next_token.item():5d}  {self_len:>8}  {cross_len:>9}  "
                  f"{counts['cross kv_proj calls']:19d}  {counts['self-attention rows']:19d}")
            if next_token.item() == EOS_ID:
                return tokens, per_step, lengths


print("with an EncoderDecoderCache:")
cache = EncoderDecoderCache()  # a DynamicKVCache for each half
with_cache, cached_counts, cached_lengths = decode_by_hand(cache)

# %%
steps = range(len(cached_lengths))
plt.step(steps, [s for s, _ in cached_lengths], "o-", where="mid", label="self-attention cache (decoder tokens)")
plt.step(steps, [c for _, c in cached_lengths], "s--", where="mid", label="cross-attention cache (source tokens)")
plt.xlabel("decoding step")
plt.ylabel("tokens stored after the step")
plt.ylim(0, max(max(pair) for pair in cached_lengths) + 1)
plt.title("The two halves of an EncoderDecoderCache", fontsize=10)
plt.grid(alpha=0.3)
plt.legend(fontsize=8, loc="lower right")
plt.show()

# %% [markdown]
# The self-attention length grows by one per step; the cross-attention length is the source
# length from the first step on and never changes. The cross-attention projection runs once
# in each of the 2 layers on step 0 and never again, and every step projects just one new
# target row per layer. Now the same loop without a cache:

# %%
print("without a cache:")
without_cache, uncached_counts, _ = decode_by_hand(None)
print("same tokens:", torch.equal(with_cache, without_cache))
assert torch.equal(with_cache, without_cache)

layers = model.config.n_layers
assert cached_counts == [(layers if t == 0 else 0, layers) for t in range(len(cached_counts))]
assert uncached_counts == [(layers, layers * (t + 1)) for t in range(len(uncached_counts))]
print("PROJECTION COUNTS CHECK PASSED")
for h in hooks:
    h.remove()

# %% [markdown]
# Without a cache every step re-projects the whole source in every layer (2 calls per step)
# and every target token so far (1, 2, 3, ... rows per layer). For a source of $S$ tokens and
# $n$ generated tokens that is $n \cdot S$ rows of cross-attention projections instead of $S$,
# and $n(n+1)/2$ self-attention rows instead of $n$, per layer.
#
# The cross-attention half costs a fixed $2 \times n_\text{layers} \times n_\text{kv heads} \times
# d_\text{head} \times S$ elements per sequence, paid once per source:

# %%
cfg = model.config
expected = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * src.shape[1] * 4
print(f"cross-attention cache: {cache.cross_attention_cache.memory_bytes():,} bytes allocated, "
      f"{expected:,} bytes used for {src.shape[1]} source tokens")
for layer in range(cfg.n_layers):
    k, v = cache.get_cross(layer)
    print(f"layer {layer}: cross keys {tuple(k.shape)}, self keys {tuple(cache.get(layer)[0].shape)}")

# %% [markdown]
# (A `DynamicKVCache` allocates room for 64 tokens on a layer's first write, so it holds more
# than it uses; a `StaticKVCache` of the exact source length would not.)
#
# ## What the decoder reads from the cross-attention cache
#
# The cross-attention keys and values are fixed, but each step asks them a new question: its
# query. The attention weights $\operatorname{softmax}(q_t K^\top / \sqrt{d})$ say which source
# tokens step $t$ reads. We recompute them from the layer's own projections (a hook catches the
# input of each decoder layer's cross-attention) for the example decoded above, averaged over
# the 4 heads. A model that reverses should read the source back to front.

# %%
def cross_attention_weights(src, src_mask, tokens):
    """Head-averaged cross-attention weights of every decoder layer, ``(steps, source tokens)``
    each, when the decoder reads ``tokens`` (BOS + outputs) for the source ``src`` ``(1, S)``."""
    weights = {}

    def catch(layer):
        def hook(module, args, kwargs):
            x, mask = args[0], kwargs["mask"]  # mask: (1, 1, 1, S), True = a real source token
            q = module.q_proj(x).view(1, x.shape[1], module.n_heads, module.head_dim).transpose(1, 2)
            k = module.project_kv(kwargs["memory"])[0].transpose(1, 2)
            scores = (q @ k.transpose(-1, -2)) / module.head_dim ** 0.5
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights[layer] = scores.softmax(-1)[0].mean(0)  # (steps, S)
        return hook

    hooks = [block.cross_attn.register_forward_pre_hook(catch(i), with_kwargs=True)
             for i, block in enumerate(model.decoder.blocks)]
    with torch.no_grad():
        model.decode(tokens, model.encode(src, src_mask), src_mask=src_mask)
    for h in hooks:
        h.remove()
    return weights


weights = cross_attention_weights(src, src_mask, with_cache[:, :-1])  # every step's input: BOS + outputs
source_labels = [str(t) for t in src[0].tolist()]
output_labels = [str(t) for t in with_cache[0, 1:].tolist()]
fig, axes = plt.subplots(1, len(weights), figsize=(9, 4), sharey=True)
for layer, ax in zip(weights, axes):
    image = ax.imshow(weights[layer], cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(source_labels)), source_labels)
    ax.set_yticks(range(len(output_labels)), output_labels)
    ax.set_xlabel("source token (2 = EOS)")
    ax.set_title(f"decoder layer {layer}", fontsize=10)
axes[0].set_ylabel("token written at this step")
fig.colorbar(image, ax=axes, label="attention weight (mean of 4 heads)", shrink=0.8)
plt.show()

n_symbols = int(src_mask.sum()) - 1  # the source without its EOS
last = weights[len(weights) - 1]
mirrored = sum(int(last[t].argmax()) == n_symbols - 1 - t for t in range(n_symbols))
print(f"last layer: {mirrored} of the {n_symbols} symbol-writing steps look hardest at the mirrored source "
      f"position (step t -> position {n_symbols - 1} - t)")
assert mirrored >= 0.75 * n_symbols

# %% [markdown]
# The last layer draws the anti-diagonal of a reversal: to write output $t$ it looks at source
# position $n - 1 - t$, the symbol it copies (the printed count says for how many steps it is
# the strongest weight). The first layer spreads its weight more evenly: it gathers context
# the second layer uses to find its place. None of this needs the memory again after step 0 --
# every row of these maps is one query against the same cached keys.
#
# ## Cached and uncached generation agree, for all 500 problems
#
# `generate` does the same as our loop for a whole batch. We compare the cache-free reference
# with two caches: a temporary `EncoderDecoderCache` of two dynamic caches (the default), and
# the manual `KVCache` of the tutorial API, switched on with `enable_cache`. `output_logits=True`
# returns the logits of every step as well.

# %%
settings = dict(max_length=MAX_LEN + 2, temperature=0, output_logits=True)
reference = model.generate(test.src, use_cache=False, **settings)
runs = {"EncoderDecoderCache": model.generate(test.src, use_cache=True, **settings)}
model.enable_cache(max_seq_len=32)
runs["KVCache (enable_cache)"] = model.generate(test.src, use_cache=True, **settings)
print("manual cache after generating: self length", model.kv_cache.get_seq_len(0, "self"),
      "| cross length", model.kv_cache.get_seq_len(0, "cross"))
model.disable_cache()

for name, out in runs.items():
    same = torch.equal(out.sequences, reference.sequences)
    diff = (out.logits - reference.logits).abs().max().item()
    accuracy = exact_match(out.sequences[:, 1:], test.tgt_out)
    print(f"{name:23s} tokens identical: {same}, largest logit difference {diff:.1e}, exact match {accuracy:.1%}")
    assert same and torch.allclose(out.logits, reference.logits, atol=1e-4)
print("EQUIVALENCE CHECK PASSED")

# %% [markdown]
# ## Summary
#
# * An encoder-decoder decoder keeps two caches per layer: self-attention keys/values grow by
#   one token per step; cross-attention keys/values of the memory are computed on the first
#   step and only read afterwards.
# * `EncoderDecoderCache` bundles them: `update` / `get_seq_length` / `crop` / `rollback` act on the
#   self-attention half, `has_cross` / `set_cross` / `get_cross` / `get_cross_seq_length` on
#   the cross-attention half, and batch operations (`reorder_cache`, `batch_select_indices`)
#   on both, since both are indexed by batch row.
# * Caching changes the cost, not the result: cached and uncached decoding give the same
#   tokens and the same logits up to float rounding.
#
# ## Exercises: predict, then run
#
# Write your prediction down before you run each cell; the answer is folded below it.
#
# **1.** Decode a second source B with the cache left over from source A, after resetting only
# its *self-attention* half, and passing B's own memory to every step. What comes out?

# %% tags=["exercise"]
def greedy(src, src_mask, cache):
    """Greedy decoding by hand, one token per step through `cache`, until EOS."""
    memory_of_src, tokens = model.encode(src, src_mask), torch.tensor([[BOS_ID]])
    with torch.no_grad():
        while tokens[0, -1] != EOS_ID and tokens.shape[1] <= MAX_LEN + 1:
            logits = model.decode(tokens[:, -1:], memory_of_src, src_mask=src_mask, cache=cache)
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens[0, 1:].tolist()


b = next(i for i in range(1, 500) if bool(test.src_mask[i].all()) and not torch.equal(test.src[i], src[0]))
a_cache = EncoderDecoderCache()
print("source A:", src[0].tolist(), "-> output", greedy(src, src_mask, a_cache))
a_cache.self_attention_cache.reset()
print("source B:", test.src[b].tolist(), "-> output", greedy(test.src[b:b + 1], test.src_mask[b:b + 1], a_cache))

# %% [markdown]
# <details><summary>Answer</summary>
#
# The reverse of **A** again. The cross-attention half still holds A's keys and values, and
# once a layer's cross keys are cached the model reads them instead of projecting the memory it
# is given (`has_cross` is true), so B's memory is ignored. Only a full `cache.reset()` (or a
# new cache) starts a new source. Caches trade recomputation for state, and state must be
# invalidated when its input changes.
# </details>
#
# **2.** A source of 5 symbols (plus EOS). Which source position does the last layer look at
# hardest while the model writes its *first* output symbol, and while it writes its *last*?

# %% tags=["exercise"]
five = next(i for i in range(500) if int(test.src_mask[i].sum()) == 6)
five_src, five_mask = test.src[five:five + 1], test.src_mask[five:five + 1]
written = model.generate(five_src, max_length=MAX_LEN + 2, temperature=0)[:, :7]  # BOS + 5 symbols + EOS
last_layer = cross_attention_weights(five_src, five_mask, written[:, :-1])[len(model.decoder.blocks) - 1]
print("source:", five_src[0].tolist(), "output:", written[0, 1:].tolist())
print("strongest source position per step:", last_layer.argmax(-1).tolist())

# %% [markdown]
# <details><summary>Answer</summary>
#
# Position 4 for the first symbol and position 0 for the last (the printed list should run
# 4, 3, 2, 1, 0 and then somewhere for the EOS step): output $t$ of a reversal is source symbol
# $n - 1 - t$, wherever the padding of the batch put the source's end. The attention map is
# relative to the source's length, which the model only learns from where EOS sits.
# </details>
