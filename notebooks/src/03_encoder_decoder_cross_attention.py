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
# sequences, then watch both caches step by step and count the projections each step runs.

# %%
import time
from collections import Counter

import torch
import torch.nn.functional as F

from kv_cache import EncoderDecoderCache
from transformer import EnhancedTransformer
from transformer.data import BOS_ID, EOS_ID, PAD_ID, exact_match, make_seq2seq_batch

torch.manual_seed(0)
# A tiny model: one thread is faster than two for matrices this small.
torch.set_num_threads(1)

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
    """Greedy decoding until EOS; prints the table and returns (tokens, per-step counts)."""
    tokens, per_step = torch.tensor([[BOS_ID]]), []
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
            print(f"{step:4d}  {next_token.item():5d}  {self_len:>8}  {cross_len:>9}  "
                  f"{counts['cross kv_proj calls']:19d}  {counts['self-attention rows']:19d}")
            if next_token.item() == EOS_ID:
                return tokens, per_step


print("with an EncoderDecoderCache:")
cache = EncoderDecoderCache()  # a DynamicKVCache for each half
with_cache, cached_counts = decode_by_hand(cache)

# %% [markdown]
# The self-attention length grows by one per step; the cross-attention length is the source
# length from the first step on and never changes. The cross-attention projection runs once
# in each of the 2 layers on step 0 and never again, and every step projects just one new
# target row per layer. Now the same loop without a cache:

# %%
print("without a cache:")
without_cache, uncached_counts = decode_by_hand(None)
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
# * `EncoderDecoderCache` bundles them: `update` / `get_seq_length` / `crop` act on the
#   self-attention half, `has_cross` / `set_cross` / `get_cross` / `get_cross_seq_length` on
#   the cross-attention half, and batch operations (`reorder_cache`, `batch_select_indices`)
#   on both, since both are indexed by batch row.
# * Caching changes the cost, not the result: cached and uncached decoding give the same
#   tokens and the same logits up to float rounding.
