# %% [markdown]
# # Sampling: greedy, temperature, top-k, top-p
#
# A language model's last layer gives one score, a *logit*, per vocabulary entry. Decoding turns
# those scores into one token. The simplest rule, take the highest score (greedy), is
# deterministic and soon repeats itself; drawing at random from the softmax is lively but now
# and then picks nonsense from the long tail of unlikely tokens. Three knobs sit in between,
# and `transformer.sampling` applies them in this order:
#
# 1. **temperature** $T$: divide the logits by $T$ -- below 1 sharpens, above 1 flattens;
# 2. **top-k**: keep the $k$ highest logits;
# 3. **top-p** (nucleus): keep the smallest set of most likely tokens whose probability reaches $p$.
#
# Removed tokens get logit $-\infty$, so softmax gives them probability 0 and renormalises the
# rest. We apply each knob to a real next-token distribution, plot it, then draw 20,000 samples
# to check that the sampler picks tokens with exactly the plotted probabilities.

# %%
from collections import Counter, defaultdict

import matplotlib.pyplot as plt
import torch

from transformer.data import load_corpus
from transformer.sampling import process_logits, sample_next_token, top_k_filter, top_p_filter
from transformer.tokenizer import ByteTokenizer

torch.manual_seed(0)
plt.rcParams.update({"figure.figsize": (6, 3.5), "figure.dpi": 80})

# %% [markdown]
# ## A real next-token distribution, by counting
#
# A real distribution needs no training: we count. For every 3-byte context in *Hamlet* we
# count which byte comes next (backing off to shorter contexts when a context never occurs).
# A count model gives unseen bytes probability zero, while a neural network spreads a little
# probability over *every* token; to get that realistic long tail we mix in 2% of the uniform
# distribution over all 256 bytes. The logits are the log-probabilities.

# %%
tok = ByteTokenizer()  # one token per UTF-8 byte: ids 4..259 (0-3 are PAD/BOS/EOS/UNK)
hamlet = next(doc.text for doc in load_corpus() if doc.name == "hamlet")
ids = tok.encode(hamlet)
ORDER, TAIL = 3, 0.02
counts = defaultdict(Counter)  # context (tuple of ids, 0 to ORDER long) -> Counter of next ids
for n in range(ORDER + 1):
    for i in range(n, len(ids)):
        counts[tuple(ids[i - n: i])][ids[i]] += 1


def next_token_logits(text: str) -> torch.Tensor:
    """(1, vocab) logits of the byte following `text` under the smoothed 4-gram count model."""
    context = tuple(tok.encode(text))[-ORDER:]
    while context not in counts:  # back off: drop the oldest byte
        context = context[1:]
    seen = counts[context]
    probs = torch.zeros(tok.vocab_size)
    probs[tok.OFFSET:] = TAIL / 256  # the tail: every byte stays possible
    for token, n in seen.items():
        probs[token] += (1 - TAIL) * n / sum(seen.values())
    return probs.log()[None]


def label(token: int) -> str:
    """How a byte id is shown on a plot axis."""
    text = tok.decode([token])
    return {" ": "␣", "\n": "↵"}.get(text, text if text.isprintable() and text != "\ufffd" else "·")


def printable(text: str) -> str:
    """`text` with control characters and broken bytes shown as '·'."""
    return "".join(c if c.isprintable() or c == "\n" else "·" for c in text.replace("\ufffd", "·"))


prompt = "To be, or not to be, th"
logits = next_token_logits(prompt)
probs = logits.softmax(-1)[0]
# The tokens every plot below shows, most likely first: the bytes Hamlet has after this context
# (at most 8). The others only have their share of the uniform tail; they go into one "rest" bar.
top = [t for t in probs.topk(8).indices.tolist() if probs[t] > 2 * TAIL / 256]
print(f"after {prompt!r}:")
print("  ".join(f"{label(t)} {probs[t]:.3f}" for t in top), f"  rest {1 - probs[top].sum():.3f} "
      f"({(probs > 0).sum() - len(top)} other tokens)")


def plot_probs(ax, p, title):
    """Bars of p (vocab,) for the `top` tokens, plus one grey bar for the mass of all others;
    an x marks a token the filters removed (probability 0)."""
    shown = p[top]
    rest = 1 - shown.sum().item()
    ax.bar(range(len(top)), shown.tolist())
    ax.bar(len(top), rest, color="grey")
    removed = [i for i, t in enumerate(top) if p[t] == 0] + ([len(top)] if rest < 1e-6 else [])
    if removed:
        ax.plot(removed, [0] * len(removed), "x", color="tab:red", clip_on=False)
    ax.set_xticks(range(len(top) + 1), [label(t) for t in top] + ["rest"], fontsize=8)
    ax.set_xlabel("next byte (x = removed)", fontsize=8)
    ax.set_title(f"{title}\n{int((p > 0).sum())} tokens possible", fontsize=9)


fig, ax = plt.subplots()
plot_probs(ax, probs, "softmax of the raw logits")
ax.set_ylabel("probability")
plt.show()

# %% [markdown]
# The grey "rest" bar is the long tail: the 249 bytes that never follow " th" in *Hamlet*,
# each with a tiny probability, together the 2% we mixed in. Sampling from this
# distribution as it is would pick one of them every few dozen tokens.
#
# ## Greedy
#
# Greedy decoding takes the argmax: `sample_next_token(logits, do_sample=False)`. It is
# deterministic -- and here lies its problem: the same context always gives the same next
# token, so as soon as a context comes back, the text loops.

# %%
def write(n_bytes=160, seed=0, **sampling):
    """Continue "HAMLET:\n" byte by byte with the count model and `sample_next_token(**sampling)`."""
    generator = torch.Generator().manual_seed(seed)
    text = "HAMLET:\n"
    for _ in range(n_bytes):
        token = sample_next_token(next_token_logits(text), generator=generator, **sampling)
        text += tok.decode(token.tolist())
    return printable(text)


print("greedy picks:", repr(label(sample_next_token(logits, do_sample=False).item())))
print(write(do_sample=False))

# %% [markdown]
# ## Temperature
#
# $\operatorname{softmax}(z / T)$: with $T < 1$ the gaps between logits grow and the top token
# takes more of the mass; with $T > 1$ they shrink and the tail gets more. $T \to 0$ becomes
# greedy (here $T = 0$ *is* greedy) and $T \to \infty$ uniform. The set of possible tokens
# does not change.

# %%
fig, axes = plt.subplots(1, 3, figsize=(9, 3), sharey=True)
for ax, T in zip(axes, [0.5, 1.0, 2.0]):
    plot_probs(ax, process_logits(logits, temperature=T).softmax(-1)[0], f"temperature {T}")
axes[0].set_ylabel("probability")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Top-k
#
# Keep the $k$ highest logits, whatever their probabilities, and renormalise. Simple and cheap,
# but $k$ is blind to the shape: after " th" five tokens are plausible, after "Ham" one is,
# and a fixed $k$ keeps five in both cases.

# %%
k = 5
kept = top_k_filter(logits, k)
print(f"top-{k} keeps {probs[kept[0] > float('-inf')].sum():.3f} of the probability mass")
fig, ax = plt.subplots()
plot_probs(ax, kept.softmax(-1)[0], f"top-k, k = {k}")
plt.show()

# %% [markdown]
# ## Top-p (nucleus sampling)
#
# Sort the tokens by probability and keep the shortest prefix whose mass reaches $p$ (the most
# likely token is always kept). The number of survivors adapts: few when the model is sure,
# many when it is not. On the left, the cumulative mass of the sorted tokens and the cut at
# $p = 0.9$; on the right what survives, renormalised.

# %%
p = 0.9
nucleus = top_p_filter(logits, p)
cumulative = probs.sort(descending=True).values.cumsum(0)
n_kept = int((nucleus[0] > float("-inf")).sum())
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3))
ax1.plot(range(1, 21), cumulative[:20].tolist(), "o-")
ax1.axhline(p, color="red", linestyle="--", label=f"p = {p}")
ax1.axvline(n_kept, color="grey", linestyle=":", label=f"{n_kept} tokens kept")
ax1.set_xlabel("number of most likely tokens kept")
ax1.set_ylabel("cumulative probability")
ax1.set_xticks(range(0, 21, 2))
ax1.legend()
plot_probs(ax2, nucleus.softmax(-1)[0], f"top-p, p = {p}")
plt.tight_layout()
plt.show()
print(f"top-p {p} keeps the {n_kept} most likely tokens: {[label(t) for t in top[:n_kept]]}")

# %% [markdown]
# ## All three together, in order
#
# `process_logits(logits, temperature, top_k, top_p)` applies temperature, then top-k, then
# top-p (the order of Hugging Face `transformers` and vLLM). Here $T = 1.5$ flattens the
# distribution (and fattens the tail), top-k keeps the 6 best tokens, and top-p then drops
# the ones of those 6 that are not needed to reach 90% of *their* mass:

# %%
T, k, p = 1.5, 6, 0.9
steps = [("raw", logits)]
steps.append((f"temperature {T}", process_logits(logits, temperature=T)))
steps.append((f"then top-k {k}", process_logits(logits, temperature=T, top_k=k)))
steps.append((f"then top-p {p}", process_logits(logits, temperature=T, top_k=k, top_p=p)))
fig, axes = plt.subplots(1, 4, figsize=(11, 3), sharey=True)
for ax, (title, z) in zip(axes, steps):
    plot_probs(ax, z.softmax(-1)[0], title)
axes[0].set_ylabel("probability")
plt.tight_layout()
plt.show()

# %% [markdown]
# The order matters. Top-p measures the mass of the distribution it is given, so it sees the
# tail that temperature has fattened. Without top-k in front, the same top-p keeps far more
# tokens after temperature than before:

# %%
def survivors(z):
    return int((z[0] > float("-inf")).sum())


print(f"top-p {p} alone keeps                  {survivors(top_p_filter(logits, p)):3d} tokens")
print(f"temperature {T} then top-p {p} keeps   {survivors(process_logits(logits, temperature=T, top_p=p)):3d} tokens")

# %% [markdown]
# ## Does the sampler draw what we plotted?
#
# For each setting we draw 20,000 tokens with `sample_next_token` (one batched call with a seeded
# `torch.Generator`) and compare the observed frequencies with the probabilities
# `softmax(process_logits(...))`. With 20,000 draws a frequency's standard error is at most
# $\sqrt{0.25 / 20000} \approx 0.0035$, so every difference should stay well below 0.02 -- and
# no token outside the kept set may ever appear.

# %%
N = 20_000
settings = {
    "greedy": dict(do_sample=False),
    "temperature 0.7": dict(do_sample=True, temperature=0.7),
    "top-k 5": dict(do_sample=True, top_k=5),
    "top-p 0.9": dict(do_sample=True, top_p=0.9),
    "T 1.5, top-k 6, top-p 0.9": dict(do_sample=True, temperature=1.5, top_k=6, top_p=0.9),
}
generator = torch.Generator().manual_seed(0)
print(f"{'setting':27s} {'tokens kept':>11s} {'max |freq - prob|':>18s} {'draws outside':>14s}")
for name, kw in settings.items():
    if kw["do_sample"]:
        expected = process_logits(logits, kw.get("temperature", 1.0), kw.get("top_k"), kw.get("top_p")).softmax(-1)[0]
    else:
        expected = torch.nn.functional.one_hot(logits.argmax(-1), tok.vocab_size)[0].float()
    draws = sample_next_token(logits.expand(N, -1), generator=generator, **kw)
    observed = torch.bincount(draws, minlength=tok.vocab_size) / N
    max_diff = (observed - expected).abs().max().item()
    outside = int((observed[expected == 0] > 0).sum())
    print(f"{name:27s} {int((expected > 0).sum()):11d} {max_diff:18.4f} {outside:14d}")
    assert max_diff < 0.02 and outside == 0, name
print("SAMPLING CHECK PASSED")

# %%
fig, ax = plt.subplots()
kept_tokens = [t for t in top if expected[t] > 0]  # the last setting's survivors (nothing else was drawn)
x = torch.arange(len(kept_tokens))
ax.bar(x - 0.2, expected[kept_tokens].tolist(), width=0.4, label="probability")
ax.bar(x + 0.2, observed[kept_tokens].tolist(), width=0.4, label=f"frequency in {N:,} draws")
ax.set_xticks(x.tolist(), [label(t) for t in kept_tokens])
ax.set_xlabel("next byte (the tokens the filters keep)")
ax.set_ylabel("probability / frequency")
ax.set_title(name, fontsize=10)
ax.legend()
plt.show()

# %% [markdown]
# ## What the knobs do to text
#
# The same count model writing 160 bytes after "HAMLET:\n" with the same random seed. Plain
# sampling ($T = 1$, nothing cut) now and then draws a byte from the tail -- shown as `·` or as
# a stray letter -- and one bad byte derails the words after it. A lower temperature plus top-p
# keeps the variety of sampling and cuts the tail.

# %%
for name, kw in [("plain sampling, T = 1", dict(do_sample=True)),
                 ("T = 0.7, top-p = 0.9", dict(do_sample=True, temperature=0.7, top_p=0.9))]:
    print(f"--- {name} ---")
    print(write(**kw))

# %% [markdown]
# ## The same knobs in `generate`
#
# Both models' `generate` take the same arguments and pass them to `sample_next_token` at each
# step: `do_sample`, `temperature`, `top_k`, `top_p` and `generator`. `do_sample=False` or
# `temperature=0` is greedy; a seeded `generator` makes sampling reproducible. A random tiny
# model is enough to show the call:

# %%
from transformer import DecoderOnlyTransformer, ModelConfig

model = DecoderOnlyTransformer(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2))
prompt_ids = torch.tensor([tok.encode("HAMLET:\n")])
runs = [model.generate(prompt_ids, max_new_tokens=20, do_sample=True, temperature=0.8, top_k=50, top_p=0.95,
                       generator=torch.Generator().manual_seed(7)) for _ in range(2)]
print("same seed, same tokens:", torch.equal(runs[0], runs[1]))
print(runs[0][0, prompt_ids.shape[1]:].tolist())

# %% [markdown]
# ## Exercises: predict, then run
#
# Write your prediction down before you run each cell; the answer is folded below it.
#
# **1.** Sample 1,000 tokens after " th" with `top_k=1` and a *high* temperature, 2.0. Which
# tokens come out, and how often?

# %% tags=["exercise"]
draws = sample_next_token(logits.expand(1000, -1), do_sample=True, temperature=2.0, top_k=1,
                          generator=torch.Generator().manual_seed(0))
print(Counter(label(t) for t in draws.tolist()))

# %% [markdown]
# <details><summary>Answer</summary>
#
# "e", 1,000 times out of 1,000. Top-k with $k = 1$ keeps one token, and softmax over one
# token gives it probability 1 whatever the temperature did to the logits before: this is
# greedy decoding. Temperature rescales logits; it never reorders them, so it cannot change
# *which* token is the top one.
# </details>
#
# **2.** How many tokens does top-p 0.9 keep after temperature 0.5, 1.0 and 2.0? Which
# temperature keeps the most?

# %% tags=["exercise"]
for T in (0.5, 1.0, 2.0):
    print(f"temperature {T}: top-p 0.9 keeps {survivors(process_logits(logits, temperature=T, top_p=0.9))} tokens")

# %% [markdown]
# <details><summary>Answer</summary>
#
# The higher the temperature, the more tokens survive (the printed counts grow with $T$). A low
# temperature piles the mass onto "e", which alone comes close to 90%; a high temperature
# spreads it out, so reaching 90% takes many tokens -- at $T = 2$ a good part of the tail.
# Top-p adapts to the shape of the distribution it is *given*, after temperature.
# </details>
#
# **3.** Top-k 3 then top-p 0.8, or top-p 0.8 then top-k 3: do the two orders keep the same
# tokens?

# %% tags=["exercise"]
k_then_p = top_p_filter(top_k_filter(logits, 3), 0.8)
p_then_k = top_k_filter(top_p_filter(logits, 0.8), 3)
for name, z in (("top-k 3, then top-p 0.8", k_then_p), ("top-p 0.8, then top-k 3", p_then_k)):
    print(f"{name}: keeps {[label(t) for t in probs.argsort(descending=True).tolist() if z[0, t] > float('-inf')]}")

# %% [markdown]
# <details><summary>Answer</summary>
#
# No: the first order keeps one token fewer. Top-p measures mass *relative to what it is given*.
# After top-k, the 3 survivors are renormalised to sum to 1, each larger than before, so "e"
# and "i" alone reach 80% (0.573 + 0.146 = 0.719 of the full distribution, but 0.85 of the
# three). On the full distribution the third token is needed to pass 80%. This is why `process_logits` fixes one order (temperature, top-k, top-p, as
# Hugging Face and vLLM do), and why two libraries with the same knobs can still sample
# differently.
# </details>
