"""Long-context caches, measured: memory and time per step as the stream grows, perplexity far
past the training context, and what quantization costs in accuracy.

Run from the repository root::

    python -m benchmarks.long_context_benchmark                      # trains a small model for 60 s itself
    python -m benchmarks.long_context_benchmark --checkpoint out     # the default model from `python train.py`
    python -m benchmarks.long_context_benchmark --quick              # smoke test, seconds
    python -m benchmarks.long_context_benchmark --help

It prints GitHub-markdown tables (machine first) and writes ``--out`` (default
``benchmarks/results/long_context_cpu.json``) with the tables (``.md``) and a plot (``.png``).

What is measured
================

1. **One attention layer decoding** (the table of the LinearKVCache design note): 32 heads of
   dim 128, batch 1, float32, at 1K..16K tokens.  Each cache is filled to the length with random
   keys/values, then ``--steps`` single-token steps are timed one by one (median reported), each
   doing what ``transformer.attention`` does: rotate the new query/key (RoPE), ``update`` the
   cache, attend with ``scaled_dot_product_attention``; median and fastest step are reported
   (the fastest is the least disturbed by other processes on a shared machine).  ``full`` is a preallocated
   ``StaticKVCache`` (memory column: the bytes of the tokens it holds); ``sliding_window`` and
   ``linear`` keep ``--window`` tokens, ``sinks`` 4 + ``window - 4`` (StreamingLLM's positions: keys are
   rotated once, at their absolute position, and only the 4 sink keys are re-rotated each step); ``linear`` runs ``linear_kv_cache_attention`` with
   a random importance per token; ``quantized-8/4`` store everything in 8/4 bits (groups of 32,
   32 exact recent tokens) and attend through ``QuantizedKVCache.attend`` (blocks dequantized as
   they are read, an online softmax across them).  ``--device cuda --dtype bfloat16`` runs this
   table on a GPU.
2. **Perplexity past the training context** (context ``C`` = the model's ``max_seq_len``): the
   held-out text is read as one stream, token by token, through ``SinkKVCache(4, C - 4)``
   (StreamingLLM), ``SlidingWindowKVCache(C)`` (window attention) and a full ``DynamicKVCache``
   (dense; only up to ``--dense-max-multiple``).  Perplexity over the first 4C, 16C, 64C tokens,
   next to the same tokens scored in independent C-token windows (the usual validation loss).
3. **Quantized cache on the trained model**: ``--quant-windows`` held-out windows of ``C`` tokens
   are decoded token by token (teacher forcing) through ``QuantizedKVCache``; logits are compared
   with the uncached model's (max/mean absolute error, top-1 agreement) and perplexities with
   the full-precision one.  Bytes per token and greedy decode tokens/s against ``DynamicKVCache``.

The model for 2-3 is ``--checkpoint`` (``load_model``; its held-out split is rebuilt from the
checkpoint's training config) or, without one, a 2-layer RoPE model (d_model 128, context 64,
BPE vocabulary 512) trained here on the Shakespeare training split for ``--train-seconds``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from benchmarks.common import format_machine, machine_description, markdown_table, set_threads, write_results
from kv_cache import (DynamicKVCache, LinearKVCache, QuantizedKVCache, SinkKVCache, SlidingWindowKVCache,
                      StaticKVCache, linear_kv_cache_attention)
from transformer import DecoderOnlyTransformer, ModelConfig
from transformer.attention import _rotate_front
from transformer.layers import RotaryEmbedding, apply_rotary

ATTENTION_KINDS = ("full", "sliding_window", "sinks", "linear", "quantized-8", "quantized-4")


@dataclass
class LongContextConfig:
    """Every knob of the benchmark (``--quick`` shrinks all of them)."""

    lengths: List[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192, 16384])
    window: int = 2048
    sink_tokens: int = 4
    heads: int = 32
    head_dim: int = 128
    steps: int = 10
    dtype: str = "float32"
    device: str = "cpu"
    checkpoint: Optional[str] = None
    train_seconds: float = 60.0
    small_d_model: int = 128
    small_context: int = 64
    small_vocab: int = 512
    max_docs: Optional[int] = None
    multiples: List[int] = field(default_factory=lambda: [4, 16, 64])
    dense_max_multiple: int = 16
    quant_windows: int = 8
    decode_tokens: int = 512
    threads: Optional[int] = None
    seed: int = 0
    out: str = "benchmarks/results/long_context_cpu.json"


def quick_config(out: str = "benchmarks/results/long_context_quick.json") -> LongContextConfig:
    """Tiny sizes: the whole script in seconds (used by the smoke test)."""
    return LongContextConfig(lengths=[32, 64, 128], window=64, heads=2, head_dim=16, steps=3, train_seconds=1.0,
                             small_d_model=32, small_context=16, small_vocab=0, max_docs=6, multiples=[2, 4],
                             dense_max_multiple=2, quant_windows=2, decode_tokens=16, threads=1, out=out)


# --------------------------------------------------------------------------- 1. one attention layer
def make_attention_cache(kind: str, cfg: LongContextConfig, dtype: torch.dtype):
    if kind == "full":
        return StaticKVCache(max_cache_len=max(cfg.lengths) + cfg.steps + 4, num_layers=1, num_heads=cfg.heads,
                             head_dim=cfg.head_dim, dtype=dtype, device=cfg.device)
    if kind == "sliding_window":
        return SlidingWindowKVCache(cfg.window)
    if kind == "sinks":
        return SinkKVCache(cfg.sink_tokens, cfg.window - cfg.sink_tokens)
    if kind == "linear":
        return LinearKVCache(cfg.window, num_heads=cfg.heads, head_dim=cfg.head_dim, dtype=dtype)
    return QuantizedKVCache(nbits=int(kind.split("-")[1]), group_size=min(32, cfg.head_dim), residual_length=32)


def _fill(kind, cache, start: int, stop: int, cfg, dtype, g) -> None:
    """Append tokens ``start..stop-1`` (random keys/values) in chunks of up to 1024."""
    for a in range(start, stop, 1024):
        n = min(1024, stop - a)
        k, v = (torch.randn(1, cfg.heads, n, cfg.head_dim, generator=g, dtype=dtype).to(cfg.device) for _ in range(2))
        if kind == "linear":
            cache.update(k, v, 0, importance=torch.randn(1, cfg.heads, n, generator=g).to(cfg.device))
        else:
            cache.update(k, v, 0)


def attention_step(kind, cache, q, k, v, t: int, rotary: RotaryEmbedding, importance=None) -> torch.Tensor:
    """One decoding step of one layer, as ``transformer.attention`` does it.  ``q``/``k``/``v``:
    ``(1, H, 1, D)`` before RoPE; ``t``: the new token's absolute position."""
    if kind == "linear":  # dynamic-mask attention: an importance bias, no rotary embedding
        return linear_kv_cache_attention(q, k, v, importance, cache, cache.keep_window_size, t)[0]
    bshd = lambda x: x.transpose(1, 2)  # noqa: E731  (apply_rotary wants (B, S, H, D))
    cos, sin = rotary(torch.tensor([[t]], device=q.device))
    q, k = bshd(apply_rotary(bshd(q), cos, sin)), bshd(apply_rotary(bshd(k), cos, sin))
    if isinstance(cache, QuantizedKVCache):  # reads the packed blocks in place (blockwise, online softmax)
        cache.store(k, v, 0)
        return cache.attend(q, 0)
    keys, values = cache.update(k, v, 0)
    owed = cache.rotary_offsets(0)
    if owed is not None:  # StreamingLLM's sinks: only they are re-rotated, O(num_sink_tokens)
        _rotate_front(keys, owed, rotary)
    return F.scaled_dot_product_attention(q, keys, values)


def held_bytes(kind, cache, n: int, cfg, dtype) -> int:
    """Cache memory at ``n`` tokens: for ``full``, the tokens held (a right-sized cache); else ``memory_bytes()``."""
    if kind == "full":
        return 2 * n * cfg.heads * cfg.head_dim * torch.finfo(dtype).bits // 8
    return cache.memory_bytes()


@torch.inference_mode()
def run_attention_benchmark(cfg: LongContextConfig) -> List[Dict]:
    dtype = getattr(torch, cfg.dtype)
    rotary = RotaryEmbedding(cfg.head_dim).to(cfg.device)
    sync = torch.cuda.synchronize if cfg.device.startswith("cuda") else (lambda: None)
    rows = []
    bar = tqdm(total=len(ATTENTION_KINDS) * len(cfg.lengths), desc="attention decode", leave=False)
    # On CUDA, SDPA may pick cuDNN's kernel, which builds a new plan for every new key length
    # (~33 ms per step on an H200 with torch 2.11, measured): a growing cache would time plan
    # building, not attention.  The flash / memory-efficient kernels have no such cost.
    backends = contextlib.nullcontext() if not cfg.device.startswith("cuda") else sdpa_kernel(
        [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
    with backends:
        rows = _attention_rows(cfg, dtype, rotary, sync, bar)
    bar.close()
    return rows


def _attention_rows(cfg, dtype, rotary, sync, bar) -> List[Dict]:
    rows = []
    for kind in ATTENTION_KINDS:
        g = torch.Generator().manual_seed(cfg.seed)
        cache, filled = make_attention_cache(kind, cfg, dtype), 0
        for length in cfg.lengths:
            _fill(kind, cache, filled, length, cfg, dtype, g)
            filled = length
            steps = cfg.steps if not kind.startswith("quantized") else max(2, cfg.steps // 2)
            samples = []
            for i in range(steps + 2):  # two untimed warm-up steps
                q, k, v = (torch.randn(1, cfg.heads, 1, cfg.head_dim, generator=g, dtype=dtype).to(cfg.device)
                           for _ in range(3))
                imp = torch.randn(1, cfg.heads, 1, 1, generator=g).to(cfg.device)
                sync()
                start = time.perf_counter()
                attention_step(kind, cache, q, k, v, filled, rotary, imp)
                sync()
                if i >= 2:
                    samples.append(time.perf_counter() - start)
                filled += 1
            rows.append({"cache": kind, "tokens": length, "ms_per_step": 1e3 * statistics.median(samples),
                         "min_ms_per_step": 1e3 * min(samples),
                         "memory_mb": held_bytes(kind, cache, filled, cfg, dtype) / 2 ** 20,
                         "samples_ms": [1e3 * s for s in samples]})
            bar.update(1)
    return rows


# --------------------------------------------------------------------------- the model of 2 and 3
def heldout_tokens(tokenizer, val_fraction=0.1, seed=1337, data=None, max_docs=None):
    """The training run's validation split as one token stream (and the training split)."""
    from transformer.data import load_corpus, split_documents, tokenize_documents
    docs = load_corpus(data)[:max_docs] if max_docs else load_corpus(data)
    train_docs, val_docs = split_documents(docs, val_fraction, seed=seed)
    return tokenize_documents(train_docs, tokenizer), tokenize_documents(val_docs, tokenizer)


def train_small_model(cfg: LongContextConfig):
    """A 2-layer RoPE model trained on the Shakespeare training split for ``cfg.train_seconds``."""
    from transformer.data import TokenDataset, load_corpus, split_documents
    from transformer.tokenizer import ByteTokenizer, Tokenizer
    from transformer.training import configure_optimizer, lm_loss
    if cfg.small_vocab:
        docs = load_corpus()[:cfg.max_docs] if cfg.max_docs else load_corpus()
        tok = Tokenizer.train(split_documents(docs, 0.1, seed=1337)[0], vocab_size=cfg.small_vocab)
    else:
        tok = ByteTokenizer()
    train, val = heldout_tokens(tok, max_docs=cfg.max_docs)
    torch.manual_seed(cfg.seed)
    model = DecoderOnlyTransformer(ModelConfig(
        vocab_size=tok.vocab_size, d_model=cfg.small_d_model, n_layers=2, n_heads=4, max_seq_len=cfg.small_context,
        pos_encoding="rope", norm="rmsnorm", bias=False, eos_token_id=None))
    opt = configure_optimizer(model, lr=3e-3)
    data = TokenDataset(train, block_size=cfg.small_context, batch_size=16, seed=cfg.seed)
    end, steps = time.perf_counter() + cfg.train_seconds, 0
    while time.perf_counter() < end or steps == 0:
        loss = lm_loss(model, *data.next_batch())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    source = (f"2-layer RoPE model (d_model {cfg.small_d_model}, context {cfg.small_context}, vocab "
              f"{tok.vocab_size}) trained here for {steps} steps ({cfg.train_seconds:g} s), final train loss "
              f"{loss.item():.2f}")
    return model.eval(), val, source


def load_trained(directory: str, max_docs=None):
    """``load_model`` on ``directory`` (or its ``best``/``last`` subfolder) + its held-out stream."""
    from transformer.checkpoint import load_checkpoint, load_model
    root = Path(directory)
    path = next((p for p in (root / "best", root / "last", root) if (p / "model.safetensors").exists()), root)
    model, tokenizer, ckpt = load_model(path)
    if tokenizer is None:
        raise SystemExit(f"checkpoint {path} has no tokenizer; cannot rebuild its held-out text")
    tcfg = {}
    for p in (path, root / "last"):
        try:
            state = load_checkpoint(p).train_state or {}
            tcfg = state.get("train_config", {}) or tcfg
        except Exception:  # noqa: BLE001 -- a checkpoint without train state: use the defaults
            continue
        if tcfg:
            break
    _, val = heldout_tokens(tokenizer, tcfg.get("val_fraction", 0.1), tcfg.get("seed", 1337), tcfg.get("data"),
                            max_docs)
    return model.eval(), val, f"checkpoint {path} ({model.num_parameters():,} parameters, context " \
                              f"{model.config.max_seq_len})"


# --------------------------------------------------------------------------- 2. perplexity
@torch.inference_mode()
def streaming_nll(model, tokens: torch.Tensor, cache, desc: str = "") -> torch.Tensor:
    """Negative log-likelihood of ``tokens[1:]``, reading ``tokens`` one at a time through ``cache``."""
    logits, nll = [], []
    for t in tqdm(range(len(tokens) - 1), desc=desc, leave=False, mininterval=2):
        logits.append(model(tokens[None, t:t + 1], cache=cache)[0, -1])
        if len(logits) == 256 or t == len(tokens) - 2:
            targets = tokens[t + 2 - len(logits):t + 2]
            nll.append(F.cross_entropy(torch.stack(logits).float(), targets, reduction="none"))
            logits = []
    return torch.cat(nll)


@torch.inference_mode()
def window_nll(model, tokens: torch.Tensor, C: int, batch: int = 16) -> torch.Tensor:
    """The reference: ``tokens`` cut into independent windows of ``C`` (how training's validation
    loss is computed) -- what the model does on text in its trained range.  NLL of ``tokens[1:]``."""
    n = (len(tokens) - 1) // C * C
    x, y = tokens[:n].view(-1, C), tokens[1:n + 1].view(-1, C)
    out = [F.cross_entropy(model(x[i:i + batch]).float().flatten(0, 1), y[i:i + batch].flatten(), reduction="none")
           for i in range(0, len(x), batch)]
    return torch.cat(out)


def run_perplexity(model, val: torch.Tensor, cfg: LongContextConfig) -> Dict:
    C, s = model.config.max_seq_len, cfg.sink_tokens
    longest = max(cfg.multiples) * C
    if len(val) < longest + 1:
        raise SystemExit(f"the held-out text has {len(val)} tokens; {max(cfg.multiples)}x the context needs {longest + 1}")
    stream = val[:longest + 1]
    caches = {"sinks": lambda: SinkKVCache(s, C - s), "sliding_window": lambda: SlidingWindowKVCache(C),
              "dense": lambda: DynamicKVCache()}
    nll = {}
    for name, make in caches.items():
        n = longest if name != "dense" else min(longest, cfg.dense_max_multiple * C)
        nll[name] = streaming_nll(model, stream[:n + 1], make(), desc=f"ppl {name}")
    nll["windows"] = window_nll(model, stream, C)
    rows = []
    for m in [1] + list(cfg.multiples):
        row = {"multiple": m, "tokens": m * C}
        for name, values in nll.items():
            row[name] = math.exp(values[:m * C].mean().item()) if len(values) >= m * C else None
        rows.append(row)
    block = C  # the curve for the plot: mean NLL per block of C tokens
    curves = {name: [v[i:i + block].mean().item() for i in range(0, len(v) - block + 1, block)]
              for name, v in nll.items()}
    return {"context": C, "sinks": s, "rows": rows, "curve_block": block, "curves": curves}


# --------------------------------------------------------------------------- 3. quantization
QUANT_CONFIGS = ((8, 32), (4, 32), (2, 32), (4, 0))


@torch.inference_mode()
def run_quantized(model, val: torch.Tensor, cfg: LongContextConfig) -> Dict:
    mc = model.config
    C, B = mc.max_seq_len, cfg.quant_windows
    x = val[:B * C + 1]
    inputs, targets = x[:-1].view(B, C), x[1:].view(B, C)
    ref = model(inputs).float()
    ref_ppl = math.exp(F.cross_entropy(ref.flatten(0, 1), targets.flatten()).item())
    group = 32 if mc.head_dim % 32 == 0 else mc.head_dim
    fp32_per_token = 2 * mc.n_layers * mc.n_kv_heads * mc.head_dim * 4
    rows = []
    for label, make in [("dynamic (float32)", DynamicKVCache)] + [
            (f"{b}-bit, residual {r}", lambda b=b, r=r: QuantizedKVCache(nbits=b, group_size=group, residual_length=r))
            for b, r in QUANT_CONFIGS]:
        cache = make()
        got = torch.cat([model(inputs[:, t:t + 1], cache=cache) for t in range(C)], dim=1).float()
        err = (got - ref).abs()
        per_token = cache.bytes_per_token() / B if isinstance(cache, QuantizedKVCache) else fp32_per_token
        rows.append({"cache": label, "bytes_per_token": per_token, "vs_float32": fp32_per_token / per_token,
                     "max_abs_logit_error": err.max().item(), "mean_abs_logit_error": err.mean().item(),
                     "top1_agreement": (got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                     "val_ppl": math.exp(F.cross_entropy(got.flatten(0, 1), targets.flatten()).item()),
                     "ref_val_ppl": ref_ppl})
    prompt = val[None, :16]
    speed = []
    for label, kind, options in [("dynamic (float32)", "dynamic", None), ("quantized 8-bit", "quantized", {"nbits": 8}),
                                 ("quantized 4-bit", "quantized", {"nbits": 4})]:
        kw = dict(cache_implementation=kind, cache_config=options, eos_token_id=None)
        model.generate(prompt, 4, **kw)  # warm-up
        start = time.perf_counter()
        model.generate(prompt, cfg.decode_tokens, **kw)
        speed.append({"cache": label, "new_tokens": cfg.decode_tokens,
                      "tokens_per_s": cfg.decode_tokens / (time.perf_counter() - start)})
    return {"logit_std": ref.std().item(), "group_size": group, "rows": rows, "speed": speed}


# --------------------------------------------------------------------------- report
def render(results: Dict) -> str:
    cfg = results["config"]
    out = [f"Machine: {format_machine(results['machine'])}", ""]
    if cfg.get("device", "cpu").startswith("cuda") and torch.cuda.is_available():
        out[0] += f"; table 1 on {torch.cuda.get_device_name()}"
    by = {(r["cache"], r["tokens"]): r for r in results["attention"]}
    kinds = [k for k in ATTENTION_KINDS if any(c == k for c, _ in by)]
    if kinds:
        out += [f"### One attention layer decoding: {cfg['heads']} heads x {cfg['head_dim']}, batch 1, "
                f"{cfg['dtype']}, {cfg.get('device', 'cpu')}, window {cfg['window']}", "", "Cache memory (MiB):", ""]
        out.append(markdown_table([[L] + [by[k, L]["memory_mb"] for k in kinds] for L in cfg["lengths"]],
                                  ["tokens"] + kinds, floatfmt=".4g"))
        out += ["", f"Time per decoding step, ms: median (fastest) of {cfg['steps']} steps "
                    f"({max(2, cfg['steps'] // 2)} for quantized):", ""]
        out.append(markdown_table([[L] + [f"{by[k, L]['ms_per_step']:.3g} ({by[k, L]['min_ms_per_step']:.3g})"
                                          for k in kinds] for L in cfg["lengths"]], ["tokens"] + kinds))
    if "perplexity" in results:
        p = results["perplexity"]
        out += ["", f"### Perplexity past the training context ({results['model']})", "",
                f"Context C = {p['context']}; sinks = SinkKVCache({p['sinks']}, {p['context'] - p['sinks']}), "
                f"sliding_window = SlidingWindowKVCache({p['context']}), dense = full cache (RoPE past C); the "
                f"last column scores the same tokens in independent C-token windows (no cache, the model's "
                f"usual validation), for reference.", ""]
        out.append(markdown_table([[f"{r['multiple']}x", r["tokens"], r["sinks"], r["sliding_window"], r["dense"],
                                    r["windows"]] for r in p["rows"]],
                                  ["stream", "tokens", "sinks", "sliding_window", "dense", f"{p['context']}-token windows"],
                                  floatfmt=".2f"))
    if "quantized" in results:
        q = results["quantized"]
        out += ["", f"### Quantized cache ({results['model']}; groups of {q['group_size']}, "
                f"logit std {q['logit_std']:.2f})", ""]
        out.append(markdown_table([[r["cache"], r["bytes_per_token"], r["vs_float32"], r["max_abs_logit_error"],
                                    r["mean_abs_logit_error"], r["top1_agreement"], r["val_ppl"],
                                    r["val_ppl"] - r["ref_val_ppl"]] for r in q["rows"]],
                                  ["cache", "bytes/token", "x smaller", "max |dlogit|", "mean |dlogit|",
                                   "top-1 agree", "val ppl", "ppl change"], floatfmt=".4g"))
        out += ["", "Greedy decode speed:", ""]
        out.append(markdown_table([[r["cache"], r["new_tokens"], r["tokens_per_s"]] for r in q["speed"]],
                                  ["cache", "new tokens", "tokens/s"], floatfmt=".1f"))
    return "\n".join(out)


def plot(results: Dict, path: Path) -> Optional[Path]:
    """Up to three panels: ms/step and memory vs tokens, NLL along the stream.  Needs matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    attention, perplexity = results["attention"], results.get("perplexity")
    panels = (2 if attention else 0) + (1 if perplexity else 0)
    if not panels:
        return None
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    axes = list(axes[0])
    if attention:
        for kind in ATTENTION_KINDS:
            rows = [r for r in attention if r["cache"] == kind]
            axes[0].plot([r["tokens"] for r in rows], [r["min_ms_per_step"] for r in rows], "o-", label=kind)
            axes[1].plot([r["tokens"] for r in rows], [r["memory_mb"] for r in rows], "o-", label=kind)
        for ax, label in zip(axes[:2], ["ms per decoding step (fastest)", "cache memory (MiB)"]):
            ax.set(xscale="log", yscale="log", xlabel="tokens in the stream", ylabel=label, title="one attention layer")
            ax.legend(fontsize=7)
    if perplexity:
        ax = axes[-1]
        for name, curve in perplexity["curves"].items():
            xs = [(i + 0.5) * perplexity["curve_block"] / perplexity["context"] for i in range(len(curve))]
            style = {"sliding_window": dict(ls="--"), "windows": dict(ls=":", color="grey")}.get(name, {})
            ax.plot(xs, curve, label=name, lw=1, **style)
        ax.set(xscale="log", xlabel="position / training context", ylabel="mean NLL (nats) per C tokens",
               title="reading held-out text as one stream")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def run(cfg: LongContextConfig, attention: bool = True, model_parts: bool = True) -> Dict:
    """Run the parts asked for and write ``cfg.out`` (+ ``.md``, ``.png``); returns the results dict."""
    set_threads(cfg.threads)
    results = {"config": dataclasses.asdict(cfg), "machine": machine_description()}
    results["attention"] = run_attention_benchmark(cfg) if attention else []
    if model_parts:
        if cfg.checkpoint:
            model, val, source = load_trained(cfg.checkpoint, cfg.max_docs)
        else:
            model, val, source = train_small_model(cfg)
        results["model"] = source
        results["perplexity"] = run_perplexity(model, val, cfg)
        results["quantized"] = run_quantized(model, val, cfg)
    text = render(results)
    print(text)
    out = Path(cfg.out)
    write_results(out, results, machine=results["machine"], markdown=text)
    results["plot"] = str(plot(results, out.with_suffix(".png")))
    return results


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = LongContextConfig()
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in seconds")
    p.add_argument("--lengths", type=int, nargs="+", default=d.lengths, help="stream lengths of the attention table")
    p.add_argument("--window", type=int, default=d.window, help="tokens kept by the bounded caches (table 1)")
    p.add_argument("--sink-tokens", type=int, default=d.sink_tokens, help="StreamingLLM sink tokens")
    p.add_argument("--heads", type=int, default=d.heads, help="attention heads (table 1)")
    p.add_argument("--head-dim", type=int, default=d.head_dim, help="head size (table 1)")
    p.add_argument("--steps", type=int, default=d.steps, help="timed decoding steps per length")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=d.dtype, help="dtype of table 1")
    p.add_argument("--device", default=d.device, help="device of table 1 (cpu, cuda); the model parts run on the CPU")
    p.add_argument("--checkpoint", default=None, help="trained model folder (e.g. out); default: train a small one")
    p.add_argument("--train-seconds", type=float, default=d.train_seconds, help="training time of the small model")
    p.add_argument("--multiples", type=int, nargs="+", default=d.multiples, help="stream lengths in training contexts")
    p.add_argument("--dense-max-multiple", type=int, default=d.dense_max_multiple,
                   help="longest stream (in contexts) read with the full cache, whose steps grow with the stream")
    p.add_argument("--quant-windows", type=int, default=d.quant_windows, help="held-out windows for the logit error")
    p.add_argument("--decode-tokens", type=int, default=d.decode_tokens, help="new tokens of the decode-speed run")
    p.add_argument("--skip-model", action="store_true", help="only the attention table (no model, no perplexity)")
    p.add_argument("--skip-attention", action="store_true", help="only the model parts (perplexity, quantization)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores available)")
    p.add_argument("--out", default=None, help=f"JSON path; .md and .png are written next to it (default {d.out})")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> LongContextConfig:
    if args.quick:
        cfg = quick_config()
    else:
        cfg = LongContextConfig(lengths=args.lengths, window=args.window, sink_tokens=args.sink_tokens,
                                heads=args.heads, head_dim=args.head_dim, steps=args.steps, dtype=args.dtype,
                                device=args.device,
                                train_seconds=args.train_seconds, multiples=args.multiples,
                                dense_max_multiple=args.dense_max_multiple, quant_windows=args.quant_windows,
                                decode_tokens=args.decode_tokens)
    cfg.checkpoint = args.checkpoint
    if args.threads is not None:
        cfg.threads = args.threads
    if args.out:
        cfg.out = args.out
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = parse_args(argv)
    return run(config_from_args(args), attention=not args.skip_attention, model_parts=not args.skip_model)


if __name__ == "__main__":
    main()
