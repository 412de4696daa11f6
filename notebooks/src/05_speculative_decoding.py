# %% [markdown]
# # Speculative decoding: guess cheaply, verify in one pass
#
# With a KV cache, decoding one token costs one forward pass of the model, and the passes are
# *sequential*: token $t+1$ needs token $t$. A pass over several tokens costs much less than
# that many passes over one: the fixed costs of a pass (reading every weight from memory,
# launching every kernel, the Python around them) are paid once, however many tokens go
# through. For a small batch on a GPU they dominate, and a pass over 5 tokens costs little more
# than a pass over 1; below we measure the ratio on this machine. Speculative decoding
# (Leviathan et al. 2023; Chen et al. 2023) turns that spare capacity into speed:
#
# 1. a cheap **drafter** guesses the next $k$ tokens, one at a time;
# 2. the expensive **target** model scores all $k$ guesses in **one** forward pass over its cache;
# 3. an acceptance test keeps a prefix of the guesses and adds one token of the target's own.
#
# A round costs one target pass and yields between 1 and $k+1$ tokens. The acceptance test is
# built so that the output is *exactly* what the target alone would produce: token for token
# when decoding greedily, and in distribution when sampling.
#
# ## The rule
#
# At a drafted position the drafter drew $x \sim q$, and the target's distribution is $p$ (both
# after the same temperature / top-k / top-p).
#
# * **Accept** $x$ with probability $a(x) = \min\left(1, \frac{p(x)}{q(x)}\right)$.
# * On the first **rejection**, draw the token from the residual
#   $r = \dfrac{\max(0,\, p - q)}{\sum_y \max(0,\, p(y) - q(y))}$ and end the round.
# * If all $k$ are accepted, draw a **bonus** token from the target's next distribution
#   (the verification pass computed it anyway).
#
# Why the output is $p$: with the overlap $\beta = \sum_x \min(p(x), q(x))$, a rejection happens
# with probability $\sum_x q(x)(1 - a(x)) = 1 - \beta$, which is also the mass of $\max(0, p - q)$. So
#
# $$P(y) = \underbrace{q(y)\,a(y)}_{\text{drafted and kept}} + \underbrace{(1-\beta)\,r(y)}_{\text{rejected, resampled}}
#        = \min(p(y), q(y)) + \max(0, p(y) - q(y)) = p(y).$$
#
# The drafter only decides how *often* we get a free token, never *which* tokens come out.
# Two special cases matter:
#
# * **greedy** (temperature 0): $p$ and $q$ are one-hot at their argmax. Keep the guess iff it is
#   the target's argmax; otherwise emit the target's argmax. No randomness at all.
# * **prompt lookup** (no draft model: copy what followed an earlier occurrence of the last few
#   tokens): $q$ is a point mass on the guess $x$. Then $a(x) = p(x)$, and the residual is $p$ with
#   $x$ removed, renormalised: $P(x) = p(x)$ and $P(y) = (1 - p(x))\,\frac{p(y)}{1-p(x)} = p(y)$.

# %%
import copy
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

from spec_decoding import (PromptLookupDrafter, SpecDecodingPair, SpeculativeDecoder, find_ngram_continuation,
                           format_stats, make_demo_pair, position_output_distribution, residual_distribution,
                           speculative_generate)

torch.set_num_threads(1)  # tiny models: one thread is fastest, and timings are steadier
plt.rcParams.update({"figure.figsize": (6, 3.2), "figure.dpi": 80})

# %% [markdown]
# ## A target and a draft that agree (without training)
#
# The draft must be much cheaper than the target *and* agree with it often. Two random models
# never agree, so we build the pair the way "self-speculative" methods (LayerSkip, Draft & Verify)
# do: the draft is the target's **first layer** plus its output head. `make_demo_pair` draws
# random weights in which the 7 later blocks only nudge the residual stream, so the cut model
# predicts the full one's token most of the time, at a fraction of the cost.

# %%
target, draft = make_demo_pair(vocab_size=512, d_model=128, n_layers=8, draft_layers=1, late_layer_scale=0.05)
prompt = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))


def pass_ms(model, n_tokens, repeats=30):
    """Median milliseconds of one cached forward pass over `n_tokens` new tokens after the prompt."""
    cache = model.new_cache("dynamic")
    times = []
    with torch.inference_mode():
        model(prompt, cache=cache)
        for _ in range(repeats):
            start = time.perf_counter()
            model(prompt[:, :n_tokens], cache=cache)
            times.append(time.perf_counter() - start)
            cache.rollback(prompt.shape[1])
    return 1e3 * float(np.median(times))


t1, t5, d1 = pass_ms(target, 1), pass_ms(target, 5), pass_ms(draft, 1)
print(f"target: {sum(p.numel() for p in target.parameters()) / 1e6:.2f}M params, "
      f"draft: {sum(p.numel() for p in draft.parameters()) / 1e6:.2f}M params")
print(f"one target pass: {t1:.2f} ms for 1 token, {t5:.2f} ms for 5 tokens; one draft pass: {d1:.2f} ms "
      f"(cost ratio c = {d1 / t1:.2f})")
print(f"5 tokens in one pass cost {t5 / t1:.1f}x one token; 5 one-token passes would cost 5.0x")

# %% [markdown]
# The last line is the lever. Checking 4 guesses takes one target pass over 5 tokens instead of
# 5 passes over 1: the printed ratio, against 5.0, is what a fully accepted round saves in
# target time. (These are medians of 30 timings on a shared CPU, so the ratio moves by a few
# tenths between runs; on a GPU it is closer still to 1.) The draft's cost relative to the
# target, $c$, is the other half of the bill.

# %% [markdown]
# ## One round, phase by phase
#
# `SpecDecodingPair` keeps the two models together and exposes a round's three phases on plain
# tensors (no caches, for reading). We sample at temperature 1 and look at $p(x)$, $q(x)$ and the
# acceptance probability of each guess.

# %%
pair = SpecDecodingPair(draft, target, num_draft_tokens=4, temperature=1.0)
g = torch.Generator().manual_seed(3)
draft_tokens, q = pair.generate_draft_sequence(prompt, generator=g)  # (1, 4), (1, 4, V)
p = pair.verify_draft_with_target(prompt, draft_tokens)  # (1, 5, V): one target pass
for i, x in enumerate(draft_tokens[0].tolist()):
    px, qx = p[0, i, x].item(), q[0, i, x].item()
    print(f"draft {i}: token {x:3d}   q(x) = {qx:.3f}   p(x) = {px:.3f}   accept with prob {min(1, px / qx):.3f}")
n, token = pair.process_acceptance_and_resampling(q, p, draft_tokens, g)
print(f"-> accepted {n} draft(s), then the target's token {token}: {n + 1} tokens for one target pass")

# %% [markdown]
# ## Greedy: the same tokens as the target, in fewer target passes
#
# `speculative_generate` runs the real loop: both models decode from their own KV caches, and
# after every round both caches are cut back (`rollback`) to the accepted tokens. At temperature 0
# the output must equal `target.generate` exactly.

# %%
reference = target.generate(prompt, 64)
tokens, stats = speculative_generate(target, draft, prompt, 64, num_draft_tokens=4)
print("identical to target.generate:", torch.equal(tokens, reference))
print(format_stats(stats))

# %% [markdown]
# ## Accepted and rejected tokens, round by round
#
# `SpeculativeDecoder.step()` runs one round and reports it. Each row below is a round (sampling
# at temperature 0.8): accepted guesses in green; the first rejected guess in red, overwritten by
# the target's own token (shown as `guess→token`); later guesses, discarded unchecked, in grey;
# and when every guess survived, the bonus token in blue.

# %%
dec = SpeculativeDecoder(target, draft, prompt, 48, num_draft_tokens=4, temperature=0.8, seed=1)
rounds = []
while not dec.finished:
    rounds.append(dec.step())

K = max(len(r.proposed) for r in rounds) + 1
EMPTY, ACCEPTED, REJECTED, DISCARDED, BONUS = range(5)
grid = np.full((len(rounds), K), EMPTY)
labels = [[""] * K for _ in rounds]
for i, r in enumerate(rounds):
    for j, x in enumerate(r.proposed):
        grid[i, j] = ACCEPTED if j < r.accepted else REJECTED if j == r.accepted else DISCARDED
        labels[i][j] = str(x)
    last = r.emitted[-1]
    if r.bonus:
        grid[i, len(r.proposed)] = BONUS
        labels[i][len(r.proposed)] = str(last)
    else:
        labels[i][r.accepted] = f"{r.proposed[r.accepted]}→{last}"

fig, ax = plt.subplots(figsize=(6.5, 0.28 * len(rounds) + 1.4))
palette = ["white", "#8fd18f", "#f08080", "#d9d9d9", "#87b8e8"]
ax.imshow(grid, cmap=ListedColormap(palette), vmin=0, vmax=4, aspect="auto")
for i in range(len(rounds)):
    for j in range(K):
        ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=7)
ax.set_xticks(range(K), [f"draft {j}" for j in range(K - 1)] + ["bonus"], fontsize=8)
ax.set_yticks(range(len(rounds)), [str(i) for i in range(len(rounds))], fontsize=7)
ax.set_xlabel("position in the round (token ids)", fontsize=9)
ax.set_ylabel("round", fontsize=9)
fig.legend(handles=[Patch(facecolor=palette[kind], edgecolor="0.5", label=text) for kind, text in
                    [(ACCEPTED, "accepted"), (REJECTED, "rejected → target's token"),
                     (DISCARDED, "discarded unchecked"), (BONUS, "bonus")]],
           loc="lower center", ncol=4, fontsize=7, frameon=False)
fig.tight_layout(rect=(0, 0.06, 1, 1))
plt.show()
print(format_stats(dec.stats))

# %% [markdown]
# ## The distribution check (analytic)
#
# `position_output_distribution(p, q)` enumerates every draft token $x$ and adds up
# $q(x)\,[a(x)\,\mathbb 1\{y = x\} + (1 - a(x))\, r(y)]$ using the very functions the decoder
# calls (`acceptance_probability`, `residual_distribution`). For random $p$ and $q$, including a
# point mass (prompt lookup), the result is $p$ up to float rounding. The bars show how the two
# parts, "drafted and kept" $\min(p, q)$ and "rejected, resampled" $(1-\beta)\,r$, stack up to $p$.

# %%
gen = torch.Generator().manual_seed(0)
V = 10
p = torch.softmax(2 * torch.randn(V, generator=gen, dtype=torch.float64), -1)
q = torch.softmax(2 * torch.randn(V, generator=gen, dtype=torch.float64), -1)
out = position_output_distribution(p, q)
point = torch.zeros(V, dtype=torch.float64)
point[int(q.argmax())] = 1.0
print(f"max |P - p|: random q {(out - p).abs().max():.1e}, point-mass q "
      f"{(position_output_distribution(p, point) - p).abs().max():.1e}")

kept = torch.minimum(p, q)
resampled = (1 - kept.sum()) * residual_distribution(p, q)
xs = np.arange(V)
fig, ax = plt.subplots()
ax.bar(xs - 0.2, q, 0.4, color="#bbbbbb", label="q (draft)")
ax.bar(xs + 0.2, kept, 0.4, color="#8fd18f", label="drafted and kept: min(p, q)")
ax.bar(xs + 0.2, resampled, 0.4, bottom=kept, color="#f0a860", label="rejected, resampled: (1-β) r")
ax.plot(xs + 0.2, p, "k_", markersize=14, label="p (target)")
ax.set_xlabel("token")
ax.set_ylabel("probability")
ax.legend(fontsize=7)
plt.tight_layout()
plt.show()

# %% [markdown]
# An end-to-end version of this check lives in `tests/test_spec_decoding_distribution.py`: with
# an 8-token vocabulary, thousands of sampled 3-token continuations from speculative decoding
# pass a chi-square test against the target's exact joint distribution, and the same test
# rejects a broken residual.
#
# ## How long should the draft be?
#
# If each guess is accepted independently with probability $\alpha$, a round of $k$ guesses
# yields $\mathbb E[\text{tokens}] = \frac{1 - \alpha^{k+1}}{1 - \alpha}$ tokens for one target
# pass, and costs about $1 + c\,k$ target passes of time ($c$ = draft/target cost). Longer drafts
# give more tokens per target pass, with diminishing returns, while their cost grows linearly:
# the wall-clock speedup $\frac{1 - \alpha^{k+1}}{(1 - \alpha)(1 + c k)}$ peaks at a moderate
# $k$. We measure both against plain cached decoding of the target (64 tokens, median of 3).
#
# $\alpha$ is estimated from the runs as accepted guesses / *checked* guesses (accepted ones plus
# one rejection per rejected round): guesses after a rejection are never checked. The speedup
# "theory" uses the measured cost of a verification pass over $k+1$ tokens (linear between the
# 1- and 5-token timings above) instead of assuming it costs one plain pass.

# %%
def timed(fn, repeats=3):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), result


ks = list(range(1, 9))
curves = {}
with torch.inference_mode():
    for temperature in (0.0, 0.8):
        base_t, _ = timed(lambda: target.generate(prompt, 64, do_sample=temperature > 0,
                                                  temperature=temperature or 1.0, eos_token_id=None))
        rows = []
        for k in ks:
            t, (_, st) = timed(lambda: speculative_generate(target, draft, prompt, 64, num_draft_tokens=k,
                                                            temperature=temperature, seed=0, eos_token_id=None))
            rejections = sum(a < m for a, m in zip(st.accepted_per_round, st.proposed_per_round))
            rows.append((st.tokens_per_target_pass, base_t / t, st.accepted_tokens, st.accepted_tokens + rejections))
        curves[temperature] = np.array(rows)

c = d1 / t1
k_arr = np.array(ks)
verify_ms = t1 + (t5 - t1) / 4 * k_arr  # a pass over k + 1 tokens
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
for temperature, rows in curves.items():
    alpha = rows[:, 2].sum() / rows[:, 3].sum()
    theory = (1 - alpha ** (k_arr + 1)) / (1 - alpha)
    line, = ax1.plot(ks, rows[:, 0], "o-", label=f"T={temperature:g} measured")
    ax1.plot(ks, theory, "--", color=line.get_color(), label=f"theory, α={alpha:.2f}")
    ax2.plot(ks, rows[:, 1], "o-", color=line.get_color(), label=f"T={temperature:g} measured")
    ax2.plot(ks, theory * t1 / (verify_ms + k_arr * d1), "--", color=line.get_color(), label=f"theory, c={c:.2f}")
ax1.set_title("tokens per target pass", fontsize=10)
ax1.set_ylabel("tokens / target pass")
ax2.set_title("wall-clock speedup vs target alone", fontsize=10)
ax2.set_ylabel("speedup (x)")
ax2.axhline(1, color="grey", lw=0.8)
for ax in (ax1, ax2):
    ax.set_xlabel("draft length k")
    ax.legend(fontsize=7)
plt.tight_layout()
plt.show()

# %% [markdown]
# The measured tokens per pass follow the simple formula (the guesses are not really
# independent, and one seeded run per point is noisy; the speedups are medians of only 3
# timings on a shared CPU, so read the shape of the curves, not single points). The speedup
# falls short of "tokens per pass" because a draft pass is not free ($c > 0$) and a
# verification pass over $k+1$ tokens costs more than a one-token pass on a CPU (the ratio
# printed at the top; on a GPU it hardly does), plus the bookkeeping between passes. Real draft models are 10-100x smaller than their targets, so
# $c$ is smaller than in this toy, and the best $k$ is larger.
#
# **Making it pay on a real machine.** The formula names the three levers, and the README's
# benchmark on the trained Shakespeare pair pulls all three:
#
# 1. *Verification as cheap as a step.* If a pass over $k+1$ tokens costs what a pass over one
#    does, every accepted guess is pure gain. On a GPU that is the normal case; on a CPU it
#    depends on the matrix kernel: PyTorch's float32 CPU kernel costs about $k+1$ times more for
#    $k+1$ rows at these sizes, while its bfloat16 kernel (oneDNN) costs nearly the same for
#    1 to 9 rows. So the target runs in bfloat16 (baseline included).
# 2. *A draft step that costs almost nothing* ($c \to 0$). A tiny model in eager PyTorch is
#    dominated by per-operator overhead, not arithmetic: `ModelDrafter(draft, compile=True)`
#    runs the draft's steps compiled, all $k$ greedy guesses of a round in one call
#    (`FastDecoder.greedy_draft`).
# 3. *A higher acceptance rate* $\alpha$. A draft trained on the text learns Shakespeare; a draft
#    *distilled* from the target (`train.py --preset draft --teacher out`, a KL loss to the
#    target's distribution) learns to guess what the target will say, which is what the rule
#    checks. And it should learn that *on the target's own text*: while drafting, the context
#    is what the target wrote, not Shakespeare. So the teacher first writes a few thousand
#    continuations (greedy and sampled) that make up most of each batch (`--teacher-samples`,
#    on by default in the draft preset): greedy agreement 84% -> 90%, and since the expected
#    run of accepted guesses grows like $1/(1-\alpha)$, tokens per target pass at $k=8$ go from
#    5.0 to 6.0 (`benchmarks/draft_agreement.py`).
#
# **Adaptive drafting** sidesteps choosing $k$: grow it after a fully accepted round, shrink it
# after a rejection (`adaptive=True`, bounded by `max_draft_tokens`).

# %%
_, st = speculative_generate(target, draft, prompt, 96, num_draft_tokens=2, adaptive=True, max_draft_tokens=8)
print("draft length per round:", st.proposed_per_round)
print(format_stats(st))

# %% [markdown]
# ## Prompt lookup: drafting without a draft model
#
# Text often repeats what came before (code edits, quotes, summaries). `PromptLookupDrafter`
# finds the most recent earlier occurrence of the last $n$ tokens and proposes what followed it;
# if the match is $D$ tokens back, the copy continues periodically into the present:

# %%
context = torch.tensor([5, 7, 9, 2, 8, 5, 7])
print(context.tolist(), "->", find_ngram_continuation(context, 4, max_ngram=2).tolist())

# %% [markdown]
# Random weights never copy text (a trained model does: the benchmark
# `python -m benchmarks.spec_decoding_benchmark --target out --draft out-draft` measures it on
# a checkpoint). To see the effect here we take away the target's sense of position and weaken
# its attention: its next token then depends mostly on the current one, and greedy decoding
# falls into loops, which is exactly the repetitive text prompt lookup feeds on.

# %%
looper = copy.deepcopy(target)
with torch.no_grad():
    looper.decoder.pos_emb.weight.zero_()
    for block in looper.decoder.blocks:
        block.attn.out_proj.weight.mul_(0.2)
history = looper.generate(prompt, 48)  # a context that has started to repeat itself
ref = looper.generate(history, 48)
tokens, st = speculative_generate(looper, PromptLookupDrafter(max_ngram=3), history, 48, num_draft_tokens=6)
print("identical to looper.generate:", torch.equal(tokens, ref))
print(format_stats(st))

# %% [markdown]
# ## Both caches, after the run
#
# `get_comprehensive_stats()` reports what each model's cache holds. Between rounds the target
# cache stores every accepted token but the last (it is fed with the next drafts), and the draft
# cache is at most one token further behind (after a fully accepted round it never saw its own
# last guess; it catches up at the start of the next round).

# %%
pair = SpecDecodingPair(draft, target, num_draft_tokens=4, cache_implementation="static")
out = pair.generate(prompt, 40)
for name, s in pair.get_comprehensive_stats().items():
    if name.endswith("cache"):
        print(f"{name:18s} {s['cache_type']}: {s['seq_length']} tokens stored (capacity {s['max_cache_len']}), "
              f"{s['memory_bytes'] / 1024:.0f} KiB, {s['forward_passes']} passes")
print(f"sequence length {out.shape[1]}; acceptance {pair.last_stats.acceptance_rate:.2f}")

# %% [markdown]
# ## Exercises: predict, then run
#
# Write your prediction down before you run each cell; the answer is folded below it.
#
# **1.** Use the target as its own draft (`speculative_generate(target, target, ...)`, greedy,
# $k = 4$, 64 tokens). How many tokens per target pass?

# %% tags=["exercise"]
tokens, st = speculative_generate(target, target, prompt, 64, num_draft_tokens=4, eos_token_id=None)
print("identical to target.generate:", torch.equal(tokens, reference))
print(format_stats(st))

# %% [markdown]
# <details><summary>Answer</summary>
#
# Nearly 5 ($k + 1$): every guess is the target's own argmax, so every guess is accepted and
# every round ends with a bonus token -- except the last round, which is cut short at 64
# tokens. Acceptance is 100%, and it buys nothing: drafting now costs $k$ target passes per
# round ($c = 1$), so a round of $k + 1$ tokens costs more than $k + 1$ plain steps. The
# speedup needs $c \ll 1$ *and* a high $\alpha$.
# </details>
#
# **2.** Sample at temperature 0.8 with seed 0, once with `target.generate` and once with
# `speculative_generate`. Same tokens?

# %% tags=["exercise"]
plain = target.generate(prompt, 32, do_sample=True, temperature=0.8, generator=torch.Generator().manual_seed(0),
                        eos_token_id=None)
spec, _ = speculative_generate(target, draft, prompt, 32, num_draft_tokens=4, temperature=0.8, seed=0,
                               eos_token_id=None)
new = prompt.shape[1]
print("plain:      ", plain[0, new:new + 12].tolist())
print("speculative:", spec[0, new:new + 12].tolist())
print("same tokens:", torch.equal(plain, spec))

# %% [markdown]
# <details><summary>Answer</summary>
#
# Different tokens. The guarantee is about the
# *distribution*: each token comes from the target's $p$, but the two loops use their random
# numbers differently (speculative decoding draws the drafts from $q$, an acceptance test per
# guess and a residual sample), so one seed gives two different samples of the same
# distribution. Only greedy decoding promises the identical sequence.
# </details>
#
# **3.** Prompt lookup on the *random* target (not the looper), greedy, 48 tokens, $k = 6$.
# Acceptance rate?

# %% tags=["exercise"]
tokens, st = speculative_generate(target, PromptLookupDrafter(max_ngram=3), prompt, 48, num_draft_tokens=6)
print("identical to target.generate:", torch.equal(tokens, target.generate(prompt, 48)))
print(format_stats(st))

# %% [markdown]
# <details><summary>Answer</summary>
#
# Zero, or close to it (the printed acceptance): the lookup still finds earlier occurrences of
# the last token or two and proposes what followed them, but the random target does not repeat
# itself, so what followed then is not what it says now. Every round yields about one token
# per target pass -- plain decoding plus the cost of the failed guesses. The output is still
# exactly `target.generate`'s: a bad drafter costs speed, never correctness.
# </details>
