# %% [markdown]
# # Continuous batching: a serving engine over the paged pool
#
# Notebook 06 built the memory of a server: a pool of fixed-size blocks, block tables, prefix
# sharing. This notebook puts a scheduler and a model on top of it and gets a small **serving
# engine**, `transformer.engine.LLMEngine`, the shape of vLLM (and of nano-vllm, its
# 1,000-line teaching cousin).
#
# A server answers many requests with one model. Running them one by one wastes the hardware --
# a decoding step of one sequence costs about as much as a step of many (the weights are read
# once either way) -- so requests are **batched**. The simple way, **static batching**, takes
# the next $B$ requests from the queue, pads their prompts to one length, and calls
# `model.generate` until *every* row is done. Two things go wrong:
#
# * a row whose answer is short finishes early and then **idles** -- it is still computed, its
#   tokens thrown away -- until the longest answer of its batch is complete;
# * the requests behind it in the queue **wait** for the whole batch, although a row is free.
#
# **Continuous batching** (Orca, OSDI 2022, which called it *iteration-level scheduling*)
# decides who runs *every step*: a request leaves the batch the moment it finishes and a
# waiting one takes its row in the next step. Two ingredients make that possible:
#
# * **memory that comes and goes per request**: the paged pool of notebook 06 -- a request takes
#   a block when its tokens reach one and gives everything back when it ends;
# * **a step that mixes prompts and single tokens**: a new request's prompt (its **prefill**)
#   runs in the same step as the one-token **decode** of the others. The engine packs the
#   prompt chunks into one row with no padding, and the model's mask builder makes the attention
#   block-diagonal (a token sees only its own request's keys).
#
# One step of the engine, in code (`LLMEngine.step`):
#
# ```python
# chunks = scheduler.schedule()          # who runs, how many tokens each: [(request, n), ...]
# batch  = blocks.batch(chunks)          # block tables -> where the keys go, which keys each reads
# logits = model(ids, cache=batch, ...)  # the model's ordinary forward over the packed step
# tokens = sample(logits)                # each request with its own settings
# ```
#
# In this notebook we
#
# 1. draw static and continuous batching as timelines, and count the steps and rows each wastes;
# 2. watch block tables fill and free, step by step;
# 3. shrink the pool until a request is **preempted**, and check that its answer does not change;
# 4. send two prompts with a long common prefix and watch the second skip it (**prefix caching**);
# 5. check, with asserts, that every request gets exactly the tokens `model.generate` gives it alone.

# %%
import matplotlib.pyplot as plt
import torch
from matplotlib.patches import Patch, Rectangle

from transformer import DecoderOnlyTransformer, ModelConfig
from transformer.engine import LLMEngine, SamplingParams

torch.manual_seed(0)
torch.set_num_threads(1)  # tiny tensors: one thread is fastest and steadiest
plt.rcParams.update({"figure.figsize": (6, 3), "figure.dpi": 80})

# %% [markdown]
# ## A model whose greedy choices are clear
#
# Scheduling does not care what the model learned, so a small model with random weights will
# do. One precaution: the engine runs a request's tokens in batches whose composition changes
# every step, and a batched matrix product may round differently from a single one (in the last
# bit of a float32). If two logits were nearly tied, that could flip a greedy choice. Drawing the
# weights with a large standard deviation (0.25) spreads the logits far apart, so "the same
# tokens" is a fair test. (The repository's tests build their models the same way.)

# %%
V = 61
model = DecoderOnlyTransformer(ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                           max_seq_len=128, pos_encoding="rope"))
weights = torch.Generator().manual_seed(0)
with torch.no_grad():
    for p in model.parameters():
        if p.dim() >= 2:  # matrices: far-apart logits; norms and biases keep their defaults
            p.copy_(torch.randn(p.shape, generator=weights) * 0.25)
model.eval()


def alone(prompt, n):
    """The n tokens greedy `model.generate` gives `prompt` on its own: the reference answer."""
    return model.generate(torch.tensor([prompt]), n, eos_token_id=None)[0, len(prompt):].tolist()


def random_prompt(n, gen):
    return torch.randint(0, V, (n,), generator=gen).tolist()


print(f"{sum(p.numel() for p in model.parameters()):,} parameters, float32")

# %% [markdown]
# ## 1. Static and continuous batching, as timelines
#
# The queue: 8 requests, all there at the start, with prompts of 3 to 14 tokens and answers of
# very different lengths (2 to 24 tokens, as chat answers are). Both schemes get the same width:
# at most $B = 4$ requests in a step.
#
# **Static batching.** Requests 0-3 form the first batch, 4-7 the second, in arrival order.
# Each batch is one `model.generate` call over left-padded prompts (an `attention_mask` hides the
# padding). `generate` runs one forward pass per new token -- the first over the whole prompts
# (prefill), the others over one token per row (decode) -- and stops when the *longest* answer
# of the batch is complete: the other rows keep computing tokens nobody will read. A forward
# hook on the model counts the passes.

# %%
B = 4
lengths = [5, 12, 7, 3, 9, 14, 6, 10]  # prompt lengths
answers = [14, 3, 5, 24, 4, 8, 2, 11]  # new tokens each request asks for
gen = torch.Generator().manual_seed(1)
prompts = [random_prompt(n, gen) for n in lengths]
reference = [alone(p, n) for p, n in zip(prompts, answers)]


def static_batching(prompts, answers, width=B):
    """Serve `prompts` in batches of `width`, in arrival order, one `model.generate` call per batch.

    Returns a timeline, request -> [(step, what its row did), ...], and the forward passes run
    (a forward hook records each one's input shape)."""
    passes, rows, outputs, step = [], {}, {}, 0
    hook = model.register_forward_pre_hook(lambda module, args: passes.append(tuple(args[0].shape)))
    for first in range(0, len(prompts), width):
        batch = list(range(first, min(first + width, len(prompts))))
        pad_to, longest = max(len(prompts[i]) for i in batch), max(answers[i] for i in batch)
        ids = torch.zeros(len(batch), pad_to, dtype=torch.long)
        mask = torch.zeros(len(batch), pad_to, dtype=torch.long)
        for row, i in enumerate(batch):  # left padding: every prompt ends in the last column
            ids[row, pad_to - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, pad_to - len(prompts[i]):] = 1
        out = model.generate(ids, longest, attention_mask=mask, eos_token_id=None)
        for row, i in enumerate(batch):
            outputs[i] = out[row, pad_to:pad_to + answers[i]].tolist()  # the row's tokens, the rest dropped
            rows[i] = ([(s, "waiting") for s in range(step)] + [(step, "prefill")]
                       + [(step + k, "decode") for k in range(1, answers[i])]
                       + [(step + k, "idle") for k in range(answers[i], longest)])
        step += longest
    hook.remove()
    assert all(outputs[i] == alone(prompts[i], answers[i]) for i in outputs)  # padding changes nothing
    return rows, passes


static, passes = static_batching(prompts, answers)
print(f"static batching: {len(passes)} forward passes, (rows, tokens) of the first three: {passes[:3]}")

# %% [markdown]
# **Continuous batching.** The same 8 requests go to an `LLMEngine`: a pool of 32 blocks of 4
# tokens, `max_num_seqs=4` rows, and a budget of `max_num_batched_tokens=32` tokens per step.
# We add them all, then call `engine.step()` until nothing is left. Each call returns one
# `RequestOutput` per request that ran; before the step we note where each request stood (tokens
# computed, tokens generated, times preempted), so we can tell a prefill (no token generated
# yet) from a decode (one token) and from a recompute (section 3). After every step
# `engine.check_invariants()` asserts that the pool's books balance: reference counts, free
# list and block tables agree.
#
# `serve` below does this for any engine and any arrival schedule; the later sections reuse it.

# %%
def serve(engine, arrivals):
    """Run `arrivals` = [(step, prompt, max_tokens), ...] (sorted by step) through `engine`, greedy.

    Returns the finished requests (with `.output_ids` and `.preemptions`) in arrival order and a
    trace, one dict per step: what each request did ("prefill", "recompute" or "decode"), who was
    waiting, who was preempted, every block table, the free blocks, the tokens that went through
    the model, and the prompt tokens that did not have to because the prefix cache held them."""
    pending, rids, trace, fed = list(arrivals), [], [], []

    def count(module, args, kwargs):  # requests' tokens (attention="rows" also runs idle padding rows)
        fed.append(getattr(kwargs.get("cache"), "num_sequences", args[0].numel()))

    hook = engine.model.register_forward_pre_hook(count, with_kwargs=True)
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= len(trace):
            _, prompt, n = pending.pop(0)
            rids.append(engine.add_request(prompt, SamplingParams(max_tokens=n, temperature=0)))
        before = {r: (q.num_computed, q.num_tokens, len(q.output_ids), q.preemptions)
                  for r, q in engine.requests.items() if not q.finished}
        fed.clear()
        outputs = engine.step()
        engine.check_invariants()
        ran, advanced = {}, 0
        for o in outputs:
            computed, tokens, generated, preemptions = before[o.request_id]
            ran[o.request_id] = ("recompute" if preemptions and tokens - computed > 1 else
                                 "prefill" if generated == 0 else "decode")
            advanced += engine.requests[o.request_id].num_computed - computed  # its chunk + its cache hit
        trace.append(dict(ran=ran, waiting=[r for r in before if r not in ran],
                          preempted=[r for r in before if engine.requests[r].preemptions > before[r][3]],
                          tables={r: list(s.blocks) for r, s in engine.blocks.seqs.items()},
                          free=engine.blocks.num_free_blocks, computed=sum(fed), cached=advanced - sum(fed)))
    hook.remove()
    return [engine.pop_finished(r) for r in rids], trace


def timeline(trace):
    """request -> list of (step, what it did), from a `serve` trace."""
    rows = {}
    for s, t in enumerate(trace):
        for r, kind in t["ran"].items():
            rows.setdefault(int(r), []).append((s, kind))
        for r in t["waiting"]:
            rows.setdefault(int(r), []).append((s, "waiting"))
    return rows


engine = LLMEngine(model, num_blocks=32, block_size=4, max_num_seqs=B, max_num_batched_tokens=32)
done, trace = serve(engine, [(0, p, n) for p, n in zip(prompts, answers)])
continuous = timeline(trace)
assert [r.output_ids for r in done] == reference
print(f"continuous batching: {engine.num_steps} steps, every request got its reference tokens")
for s in range(4):
    print(f"step {s}: " + ", ".join(f"request {r} {kind}" for r, kind in trace[s]["ran"].items()))

# %% [markdown]
# Now both, drawn the same way: one row per request, one column per step. Orange: the step that
# ran the request's prompt (and gave its first token); blue: a decode step; hatched grey: the
# row is in the batch, computed, but its request is already complete; light grey: waiting in the
# queue.

# %%
KIND_COLORS = {"waiting": "0.9", "prefill": "tab:orange", "recompute": "tab:red", "decode": "tab:blue",
               "idle": "0.55"}


def gantt(ax, rows, title, marks=()):
    """Draw `rows` (request -> [(step, kind), ...]) as one bar per request; `marks` = (step, request) crosses."""
    for r, cells in rows.items():
        for s, kind in cells:
            ax.add_patch(Rectangle((s, r - 0.4), 1, 0.8, facecolor=KIND_COLORS[kind], edgecolor="white", lw=0.5,
                                   hatch="///" if kind == "idle" else None))
    for s, r in marks:
        ax.plot(s + 0.5, r, "kx", ms=8, mew=2)
    end = max(s for cells in rows.values() for s, _ in cells) + 1
    ax.set_xlim(0, end), ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_yticks(range(len(rows)))
    ax.set_ylabel("request", fontsize=8), ax.set_xlabel("step (one forward pass of the batch)", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)


def waste(rows, width):
    """(steps, row-slots not doing useful work, of them while a request was waiting)."""
    steps = max(s for cells in rows.values() for s, _ in cells) + 1
    idle = idle_waiting = 0
    for s in range(steps):
        kinds = [k for cells in rows.values() for t, k in cells if t == s]
        useful = sum(k in ("prefill", "recompute", "decode") for k in kinds)
        idle += width - useful
        idle_waiting += (width - useful) * ("waiting" in kinds)
    return steps, idle, idle_waiting


def legend(ax, kinds, **where):
    ax.legend(handles=[Patch(facecolor=KIND_COLORS[k], hatch="///" if k == "idle" else None, label=k) for k in kinds],
              fontsize=7, **where)


fig, axes = plt.subplots(2, 1, figsize=(8, 5.2))
for ax, (name, rows) in zip(axes, (("static batching", static), ("continuous batching", continuous))):
    steps, idle, idle_waiting = waste(rows, B)
    gantt(ax, rows, f"{name}: {steps} steps, {idle} of {steps * B} row-slots idle "
                    f"({idle_waiting} while requests waited)")
axes[1].set_xlim(axes[0].get_xlim())  # one time axis for both
legend(axes[1], ["waiting", "prefill", "decode", "idle"], loc="center right")
fig.tight_layout()
plt.show()

# %%
useful = sum(answers)  # one row-slot per generated token
for name, rows in (("static", static), ("continuous", continuous)):
    steps, idle, idle_waiting = waste(rows, B)
    print(f"{name:>10}: {steps:2d} steps, {steps * B} row-slots = {useful} useful + {idle} idle, "
          f"{idle_waiting} of them idle while a request waited")
assert waste(static, B)[0] == len(passes)  # the static timeline is what generate() ran
assert waste(continuous, B)[0] == engine.num_steps and waste(continuous, B)[2] == 0

# %% [markdown]
# Static batching needs 35 steps: 24 for the first batch, which waits for request 3's 24 tokens,
# and 11 for the second. Request 1 is done after 3 steps and then idles for 21, while requests
# 4-7 wait in the queue. In the continuous run, request 1's row goes to request 4 at step 3, and
# the last request is admitted at step 9. Its idle row-slots are all at the end, when nothing is
# left to run -- they are simply not computed -- and none while a request waited. The whole
# queue takes 24 steps, the length of the longest request: no schedule can do better, since a
# request gets at most one token per step.
#
# Static batching *computes* its idle rows (the hatched cells cost as much as the blue ones);
# continuous batching gives those rows to requests that are waiting. The gain grows with the
# spread of the answer lengths, and in real chat traffic, where a few answers are many times
# longer than most, it is large. (Exercise 1 asks what happens when every answer has the same
# length.)
#
# A step that mixes prefills and decodes -- step 3 above, where request 4's prompt joins the
# decodes of 0, 2 and 3 -- runs the model twice in this engine: the decode rows as a `(rows, 1)`
# batch, the prompt chunks packed into one `(1, tokens)` row. vLLM's attention kernels do both
# in one launch; the schedule is the same.

# %% [markdown]
# ## 2. Block tables fill and free
#
# The engine's memory is a `BlockManager` (`engine.blocks`) over the paged pool of notebook 06.
# A request is given blocks of 4 tokens only when its tokens reach them: its **block table**
# (`engine.blocks.seqs[request_id].blocks`) lists the physical blocks holding its keys and values,
# in order. When the request finishes, all of them go back to the free list, and the next
# request that needs a block takes one. The trace recorded every table after every step:

# %%
for s in range(8):
    t = trace[s]
    print(f"after step {s}: free {t['free']:2d} | " + "  ".join(f"{r}:{b}" for r, b in t["tables"].items()))

# %% [markdown]
# Request 1 (12 prompt tokens) takes blocks 2, 3, 4 for its prompt and block 8 when its first
# answer token needs a slot; it finishes at step 2 and all four go back to the free list -- but
# not to the same end of it. Blocks 2, 3 and 4 are *full* blocks of a prompt: they keep their
# hash, so that a later request with the same prompt could still revive them from the prefix
# cache (section 4), and they go to the back of the list, to be handed out last. Block 8, partly
# filled, goes to the front: request 4, admitted at step 3, takes it first, then blocks 11 and 12.
# Physical blocks need not be contiguous, nor in order: a request's key at position `p` is in slot
# `table[p // 4] * 4 + p % 4`. Attention reads the blocks there, in place: on a GPU through
# FlexAttention (the block tables are its sparse layout), on a CPU through a small C kernel
# (`transformer/cpu_attention.py`) that follows each query's table to exactly its own keys.
#
# The whole run, drawn two ways: which request owns each physical block after each step (white:
# free), and how many blocks each request holds.

# %%
def draw_pool(trace, num_blocks, title):
    """Left: owner of every physical block after every step. Right: blocks held per request, stacked."""
    owners = sorted({int(r) for t in trace for r in t["tables"]})
    cmap = plt.get_cmap("tab10")
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), gridspec_kw={"width_ratios": [1.3, 1]})
    for s, t in enumerate(trace):
        for r, blocks in t["tables"].items():
            for b in blocks:
                left.add_patch(Rectangle((s, b), 1, 1, facecolor=cmap(int(r) % 10), edgecolor="white", lw=0.3))
    left.set_xlim(0, len(trace)), left.set_ylim(num_blocks, 0)
    left.set_xlabel("step", fontsize=8), left.set_ylabel("physical block", fontsize=8)
    left.set_title(f"{title}: owner of each block", fontsize=9)
    held = [[len(t["tables"].get(str(r), [])) for t in trace + trace[-1:]] for r in owners]  # last step drawn too
    right.stackplot(range(len(trace) + 1), held, colors=[cmap(r % 10) for r in owners], step="post",
                    labels=[f"request {r}" for r in owners])
    right.axhline(num_blocks, color="red", ls="--", lw=1, label="pool size")
    right.set_xlim(0, len(trace)), right.set_ylim(0, num_blocks * 1.25)
    right.set_xlabel("step", fontsize=8), right.set_ylabel("blocks held", fontsize=8)
    right.set_title("blocks held (the rest are free)", fontsize=9)
    right.legend(fontsize=6, loc="upper right", ncol=2)
    for ax in (left, right):
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    plt.show()


draw_pool(trace, 32, "continuous batching")
print("free blocks after each step:", [t["free"] for t in trace])
print("most blocks in use at once:", 32 - min(t["free"] for t in trace), "of 32")
assert trace[-1]["free"] == 32 and engine.blocks.num_used_blocks == 0  # everything came back

# %% [markdown]
# On the left, each row is one physical block over time: a coloured stretch is a request holding
# it, from the step its tokens reached the block to the step the request finished; white is
# free. Freed blocks are soon taken again by the next arrivals, in another colour. The memory in use follows the tokens actually stored -- at
# most half of the pool here -- not a reservation for the longest possible answer.

# %% [markdown]
# ## 3. Preemption: when the blocks run out
#
# The engine admits a request when its *prompt* fits, not its whole future answer (it cannot
# know how long that will be: a request may stop at an end-of-sequence token). So the pool can
# run out in the middle of decoding: every running request wants one more block and none is
# free. The scheduler then **preempts** the most recently admitted running request: its blocks
# are freed at once and it goes back to the *front* of the queue. Its tokens -- prompt and the
# answer so far -- are kept. When memory allows, it is admitted again and **recomputes** its
# keys and values from those tokens in one prefill (vLLM's "recompute" mode), then decodes on.
# Nothing is lost but the recomputation, and the pool's budget is never exceeded.
#
# A pool of 10 blocks of 4 tokens (40 slots) and three requests of a 6-token prompt and a
# 14-token answer: each will need 5 blocks, 15 together.

# %%
gen = torch.Generator().manual_seed(2)
tight_prompts = [random_prompt(6, gen) for _ in range(3)]
small = LLMEngine(model, num_blocks=10, block_size=4, max_num_seqs=4, max_num_batched_tokens=32)
tight_done, tight_trace = serve(small, [(0, p, 14) for p in tight_prompts])
for s, t in enumerate(tight_trace):
    if t["preempted"] or any(k == "recompute" for k in t["ran"].values()):
        print(f"step {s:2d}: preempted {t['preempted']}, ran {t['ran']}, tokens through the model "
              f"{t['computed']}, free blocks {t['free']}")
print("preemptions:", small.scheduler.num_preemptions, "| per request:", [r.preemptions for r in tight_done])

marks = [(s, int(r)) for s, t in enumerate(tight_trace) for r in t["preempted"]]
fig, ax = plt.subplots(figsize=(8, 1.9))
gantt(ax, timeline(tight_trace), f"a pool of 10 blocks: x = preempted, red = recompute "
                                 f"({small.num_steps} steps)", marks)
fig.tight_layout()
plt.show()

# %% [markdown]
# At first all three prompts fit (2 blocks each); the requests grow one token per step, and when
# the pool is full the youngest request, 2, gives its blocks to the other two. It waits until
# they finish, then recomputes its 6 prompt tokens and the 7 it had generated in one prefill step
# (red: 13 tokens through the model) and decodes on. Its answer is the one it would have got
# alone:

# %%
for p, r in zip(tight_prompts, tight_done):
    print(f"request {r.request_id}: preempted {r.preemptions}x, tokens {r.output_ids}")
    assert r.output_ids == alone(p, 14)
assert small.scheduler.num_preemptions > 0
assert all(len({b for table in t["tables"].values() for b in table}) <= 10 for t in tight_trace)  # the budget
print("preempted request's output == model.generate alone:", all(r.output_ids == alone(p, 14)
                                                                 for p, r in zip(tight_prompts, tight_done)))
draw_pool(tight_trace, 10, "a pool of 10 blocks")

# %% [markdown]
# The pool never holds more than its 10 blocks. Recomputation costs one prefill of the request's
# tokens: cheap for short requests, a lot for long ones, which is why vLLM also had a *swap* mode
# that moves a preempted request's blocks to CPU memory instead (not done here). A preempted request's full
# blocks keep their prefix hashes in the free list, so if they have not been handed to someone
# else by the time it returns, the prefix cache of section 4 gives them back and only the rest is
# recomputed. Here the other two requests used up all 10 blocks in the meantime, so request 2
# recomputes everything.

# %% [markdown]
# ## 4. Prefix caching: skip what was computed before
#
# Chat requests often begin with the same long system prompt. The keys and values of a prefix
# depend only on the prefix, so a request whose prompt starts with blocks some earlier request
# already computed can *point* its block table at those blocks (reference count 2) and prefill
# only the rest. As in notebook 06, a full block is found by a hash of its tokens and of every
# token before it; only **full** blocks are shared.
#
# Two requests share a 16-token system prompt (4 full blocks) and then differ. The first
# arrives alone; its prefill writes the 4 blocks and registers them. One step later the second
# arrives. We count the tokens each forward pass gets with the forward hook again.

# %%
gen = torch.Generator().manual_seed(3)
system = random_prompt(16, gen)
first_prompt, second_prompt = system + random_prompt(3, gen), system + random_prompt(5, gen)
engine = LLMEngine(model, num_blocks=32, block_size=4, max_num_seqs=4, max_num_batched_tokens=32,
                   enable_prefix_caching=True)
passes = []
hook = model.register_forward_pre_hook(lambda module, args: passes.append(args[0].numel()))
first = engine.add_request(first_prompt, SamplingParams(max_tokens=6, temperature=0))
engine.step()
print(f"step 0: tokens through the model {passes} (the first prompt: {len(first_prompt)} tokens)")
passes.clear()
second = engine.add_request(second_prompt, SamplingParams(max_tokens=6, temperature=0))
engine.step()
hook.remove()
tables = {r: list(engine.blocks.seqs[r].blocks) for r in (first, second)}
print(f"step 1: tokens through the model {passes} (a decode of the first, the second's prompt minus its hit)")
print("block tables:", tables)
print("prefix_hit_tokens:", engine.blocks.prefix_hit_tokens, "of", len(second_prompt), "prompt tokens")
assert engine.blocks.prefix_hit_tokens == 16 and tables[first][:4] == tables[second][:4]
assert passes == [1, len(second_prompt) - 16]

# %% [markdown]
# The second request's table starts with the first one's four physical blocks; only its last
# 5 tokens ran through the model. Drawn as tables (a number is a physical block; green with a
# thick outline: a block both tables point to):

# %%
def draw_tables(tables, title):
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(tables)))
    count = {}
    for blocks in tables.values():
        for b in blocks:
            count[b] = count.get(b, 0) + 1
    for row, (r, blocks) in enumerate(tables.items()):
        for i, b in enumerate(blocks):
            shared = count[b] > 1
            ax.add_patch(Rectangle((i, row), 1, 0.8, facecolor="tab:green" if shared else plt.get_cmap("tab10")(int(r)),
                                   edgecolor="black", lw=2 if shared else 0.5, alpha=0.8))
            ax.text(i + 0.5, row + 0.4, str(b), ha="center", va="center", fontsize=8)
    ax.set_xlim(0, max(len(b) for b in tables.values())), ax.set_ylim(len(tables), 0)
    ax.set_yticks([i + 0.4 for i in range(len(tables))], [f"request {r}" for r in tables], fontsize=8)
    ax.set_xlabel("logical block (green: shared by both)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    plt.show()


draw_tables(tables, "a shared 16-token system prompt = 4 shared blocks")
while engine.has_unfinished():
    engine.step()
    engine.check_invariants()
for rid, prompt in ((first, first_prompt), (second, second_prompt)):
    assert engine.pop_finished(rid).output_ids == alone(prompt, 6)
print("both answers == model.generate alone: True")

# %% [markdown]
# Sharing saved 16 of the second request's 21 prefill tokens (with a 1,000-token system prompt
# and a short question, it saves almost all of the prefill). Two details of the rule:
#
# * the hit is at most `len(prompt) - 1` tokens: the last prompt token always runs, because its
#   logits give the first answer token;
# * a block is shared only once it has been *written*: it enters the index after the forward
#   pass that computed it. Two requests with the same prefix admitted in the *same* step both
#   compute it:

# %%
together = LLMEngine(model, num_blocks=32, block_size=4, max_num_seqs=4, max_num_batched_tokens=64)
together.generate([first_prompt, second_prompt], SamplingParams(max_tokens=6, temperature=0))
print("admitted in the same step: prefix_hit_tokens =", together.blocks.prefix_hit_tokens)
assert together.blocks.prefix_hit_tokens == 0

# %% [markdown]
# ## 5. The check: batching changes nothing
#
# The claim of this notebook is that continuous batching, chunked prefill, preemption and
# prefix sharing change *when* a request's tokens are computed, never *which* tokens: at
# temperature 0 every request must get exactly what `model.generate` gives its prompt alone. A
# last workload puts all of it together: 12 requests arriving over the first 20 steps, half of
# them starting with the same 12-token prefix, prompts up to 30 tokens with a budget of 16
# tokens per step (so long prompts are prefilled in chunks over several steps), and a pool of
# 16 blocks, small enough to preempt. After every step the pool's invariants must hold, and at
# the end no block may be in use.

# %%
gen = torch.Generator().manual_seed(4)
shared = random_prompt(12, gen)
arrivals = []
for i in range(12):
    tail = random_prompt(int(torch.randint(1, 19, (1,), generator=gen)), gen)
    prompt = shared + tail if i % 2 else tail
    arrivals.append((int(torch.randint(0, 20, (1,), generator=gen)), prompt,
                     int(torch.randint(1, 40 - len(prompt), (1,), generator=gen))))
arrivals.sort(key=lambda a: a[0])
engine = LLMEngine(model, num_blocks=16, block_size=4, max_num_seqs=4, max_num_batched_tokens=16)
done, trace = serve(engine, arrivals)  # serve asserts engine.check_invariants() after every step

for (_, prompt, n), req in zip(arrivals, done):
    assert req.output_ids == model.generate(torch.tensor([prompt]), n, eos_token_id=None)[0, len(prompt):].tolist()
assert engine.blocks.num_used_blocks == 0 and not engine.blocks.seqs and not engine.has_unfinished()
stats = engine.stats()
cached = sum(t["cached"] for t in trace)  # tokens a request had in the pool without running them
assert stats["preemptions"] > 0 and cached > 0
assert any(len(p) > 16 for _, p, _ in arrivals)  # some prompts needed several prefill chunks
print(f"{len(done)} requests, {stats['steps']} steps, {stats['preemptions']} preemptions, "
      f"{sum(t['computed'] for t in trace)} tokens through the model and {cached} from the prefix cache, "
      f"blocks in use at the end: {stats['blocks_used']}")
print("CONTINUOUS BATCHING CHECK PASSED")

marks = [(s, int(r)) for s, t in enumerate(trace) for r in t["preempted"]]
fig, ax = plt.subplots(figsize=(9, 3.2))
gantt(ax, timeline(trace), "the check workload: staggered arrivals, chunked prefill, preemption (x)", marks)
legend(ax, ["waiting", "prefill", "recompute", "decode"], loc="upper left", bbox_to_anchor=(1.01, 1))
fig.tight_layout()
plt.show()

# %% [markdown]
# A request's row starts at its arrival (light grey while it waits). Long prompts take several
# orange steps: 16 tokens per step are shared by the decodes of the running requests and the
# prompt chunks, so the running requests keep getting a token every step while a long prompt is
# read -- that is **chunked prefill**. The tokens "from the prefix cache" are the shared
# 12-token prefix, and, for the most part, preempted requests finding their own full blocks still
# in the free list when they come back (the red steps are then shorter than a full recompute).
# (The trace measures them directly: how far each request's `num_computed` advanced in a step,
# minus the tokens the forward hook saw go through the model.) The repository's tests run hundreds of such random
# workloads (`tests/test_engine.py`), and `python -m benchmarks.serving_benchmark`, from a clone
# of the repository, measures the engine's throughput against static batching at real sizes.
#
# ## Exercises: predict, then run
#
# Write your prediction down before you run each cell; the answer is folded below it.
#
# **1.** Eight requests again, but now every answer is 6 tokens long. How many steps do static
# batching (batches of 4) and continuous batching (4 rows) take?

# %% tags=["exercise"]
same = [random_prompt(5, gen) for _ in range(8)]
static_steps = len(static_batching(same, [6] * 8)[1])
engine = LLMEngine(model, num_blocks=32, block_size=4, max_num_seqs=B, max_num_batched_tokens=32)
engine.generate(same, SamplingParams(max_tokens=6, temperature=0))
print("static:", static_steps, "steps; continuous:", engine.num_steps, "steps")

# %% [markdown]
# <details><summary>Answer</summary>
#
# 12 and 12. With equal lengths, the four requests of a batch finish together, so static
# batching never idles, and continuous batching makes the very same schedule: requests 4-7 join
# exactly when 0-3 leave. Continuous batching wins by not waiting for the *longest* request of a
# batch; when there is no spread of lengths, there is nothing to win.
# </details>
#
# **2.** A budget of `max_num_batched_tokens=8` tokens per step and one request with a
# 20-token prompt and `max_tokens=3`. At which step does its first token come out, and how many
# steps does it take in all?

# %% tags=["exercise"]
engine = LLMEngine(model, num_blocks=32, block_size=4, max_num_seqs=4, max_num_batched_tokens=8)
rid = engine.add_request(random_prompt(20, gen), SamplingParams(max_tokens=3, temperature=0))
while engine.has_unfinished():
    out = engine.step()[0]
    print(f"step {engine.num_steps - 1}: new tokens {out.new_token_ids}, finished {out.finished}")

# %% [markdown]
# <details><summary>Answer</summary>
#
# The prompt is read in chunks of 8, 8 and 4 tokens (steps 0, 1, 2); the first token comes out
# of step 2, from the logits of the prompt's last token, and the other two take one decode step
# each: 5 steps. Chunked prefill spreads a long prompt over several steps so that it never
# blocks the decodes of the other running requests for long.
# </details>
#
# **3.** The block size is 4. A request with an 8-token prompt (two full blocks) is running, and
# a second request arrives with *the very same* prompt. How many of its prompt tokens come from
# the prefix cache, and does its block table equal the first one's?

# %% tags=["exercise"]
engine = LLMEngine(model, num_blocks=32, block_size=4, max_num_seqs=4, max_num_batched_tokens=32)
prompt = random_prompt(8, gen)
a = engine.add_request(prompt, SamplingParams(max_tokens=8, temperature=0))
engine.step()
b = engine.add_request(prompt, SamplingParams(max_tokens=8, temperature=0))
engine.step()
print("prefix_hit_tokens:", engine.blocks.prefix_hit_tokens)
print("tables:", engine.blocks.seqs[a].blocks, engine.blocks.seqs[b].blocks)

# %% [markdown]
# <details><summary>Answer</summary>
#
# 7 tokens, not 8: the last prompt token must run through the model, because its logits give
# the first answer token. So the second request writes position 7 -- into the second block,
# which is shared with the first request. A shared block is read-only, so it is **copied on
# write** first: the tables share the first block and differ in the second (and the first
# request has since taken a third block for its answer).
# </details>
