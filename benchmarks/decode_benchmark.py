"""How much faster is greedy decoding with a KV cache?  And what does one cache append cost?

Run from the repository root::

    python -m benchmarks.decode_benchmark            # full run (a few minutes on 2 cores)
    python -m benchmarks.decode_benchmark --quick    # smoke test, well under a minute
    python -m benchmarks.decode_benchmark --help

It prints GitHub-markdown tables (machine description first) and saves the numbers as JSON
(``--out``, default ``benchmarks/results/decode_cpu.json``) with the same tables next to it
(``.md``).

What is measured
================

The model is ``DecoderOnlyTransformer(ModelConfig(vocab_size=8192, d_model=384, n_layers=6,
n_heads=6, pos_encoding="learned"))`` with random weights (seeded), eval mode, fp32, CPU,
batch 1, a 16-token random prompt, greedy decoding, under ``torch.inference_mode()``.
``torch.set_num_threads`` is set explicitly (default: the cores this process may use) and
printed; every implementation runs in the same process with the same setting.

1. **Decode throughput** at each ``--new-tokens`` length (default 256 and 1,024):

   * ``uncached`` -- ``generate(use_cache=False)``: every step reruns the model over the whole
     sequence so far.  ``generate`` asks for the logits of the last position only
     (``num_logits_to_keep=1``); the script checks that with a forward hook and records it
     under ``checks``.
   * ``dynamic`` -- ``cache_implementation="dynamic"`` (``kv_cache.DynamicKVCache``).
   * ``static`` -- ``cache_implementation="static"`` (``kv_cache.StaticKVCache``, preallocated
     for prompt + new tokens).  Skipped with a note if it cannot be imported.
   * ``transformers`` (only if the package is importable; it is never a dependency of the
     project): ``GPT2LMHeadModel`` from a ``GPT2Config`` of the same shape, given *our*
     random weights (so both run the same function and should produce the same tokens),
     ``activation_function="gelu"`` like ours, SDPA attention, timed with
     ``generate(max_new_tokens=N, min_new_tokens=N, do_sample=False, use_cache=True,
     pad_token_id=0)`` and, separately, with ``cache_implementation="static"``.

   tokens/s = ``N / seconds of one generate call`` -- the call includes the prompt's prefill
   and sampling, for every implementation alike.  Each mode gets one untimed warm-up call
   (full length for the cached modes; ``min(N, 64)`` tokens for ``uncached``, whose full run
   takes minutes), then ``--repeats`` timed calls (``--uncached-repeats`` for ``uncached``).
   Repeats run round-robin over the modes, so a burst of background load hits all of them
   alike.  **Reported: the median** of the timed calls (all samples are in the JSON).
   "speedup" = uncached median time / cached median time at the same ``N``; "ours/theirs" =
   our tokens/s / transformers tokens/s (> 1 means we are faster).

2. **Cost of one cache append**: ``cache.update(k, v, layer_idx=0)`` with one token,
   ``k, v`` of shape ``(1, n_kv_heads, 1, head_dim)`` = ``(1, 6, 1, 64)``, at cache length
   ``L`` in ``--append-lengths`` (default 128 ... 8,192).  The cache is first filled to ``L``
   in one update.  For ``DynamicKVCache`` that leaves capacity exactly ``L`` -- the state that
   token-by-token growth from the default ``initial_capacity=64`` reaches at a power-of-two
   ``L`` -- so the first timed append triggers a capacity doubling (the worst moment to start).
   Then **L appends are timed one by one, taking the length from L to 2L**: exactly one
   doubling period, so

   * *median* = the steady per-append cost (an append into spare room);
   * *amortised mean* = total time / ``L`` = the true amortised cost, the one reallocation
     (allocate ``2L``, copy ``L`` tokens) spread over the appends it pays for;
   * *max* = the reallocation spike itself.

   ``StaticKVCache`` (capacity ``2L``) is timed the same way.  The naive ``torch.cat`` cache
   (``_NaiveCatCache`` below, what a first implementation usually does) copies the whole
   history on *every* append, so all its appends cost the same; it is timed over
   ``min(L, --naive-window)`` appends to keep the run short.  Each measurement is repeated
   ``--append-repeats`` times with a fresh cache (garbage collection off while timing);
   median and max pool all samples, the amortised mean is the median of the per-repeat means.
   Ratios are taken against the first (shortest) length: an O(1) append keeps them near 1.

Targets (checked in the last table): cached decode >= 20x uncached at 1,024 new tokens; ours
at least as fast as transformers; a dynamic append at 8,192 within 1.3x of one at 128.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

import kv_cache
from kv_cache import DynamicKVCache
from transformer import DecoderOnlyTransformer, ModelConfig

from .common import (TimingResult, format_machine, int_list, load_average, machine_description, markdown_table,
                     set_threads, write_results)

try:  # progress bar is a nicety, never a requirement
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm bar on stderr (cleared when done), or a do-nothing stand-in."""
    if not enabled or tqdm is None:
        return _NoBar()
    return tqdm(total=total, desc=desc, leave=False, file=sys.stderr)


DEFAULT_OUT = "benchmarks/results/decode_cpu.json"
QUICK_OUT = "benchmarks/results/decode_cpu_quick.json"
SPEEDUP_TARGET = 20.0
APPEND_RATIO_TARGET = 1.3


@dataclass
class DecodeBenchConfig:
    """Everything the benchmark varies.  ``quick_config()`` / ``tiny_config()`` are presets."""

    vocab_size: int = 8192
    d_model: int = 384
    n_layers: int = 6
    n_heads: int = 6
    prompt_len: int = 16
    new_tokens: Tuple[int, ...] = (256, 1024)
    modes: Tuple[str, ...] = ("uncached", "dynamic", "static")
    repeats: int = 3
    uncached_repeats: int = 1
    hf: bool = True  # compare with transformers' GPT-2 when importable
    hf_static: bool = True
    append_lengths: Tuple[int, ...] = (128, 256, 512, 1024, 2048, 4096, 8192)
    append_repeats: int = 3
    naive_window: int = 32
    threads: Optional[int] = None  # None = every core this process may use
    seed: int = 0
    progress: bool = True

    def model_config(self) -> ModelConfig:
        return ModelConfig(vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers,
                           n_heads=self.n_heads,
                           # room for the longest run (and the 3-token check of the uncached path)
                           max_seq_len=self.prompt_len + max(*self.new_tokens, 3),
                           pos_encoding="learned")


def quick_config(**changes) -> DecodeBenchConfig:
    """Full model shape, short runs: a smoke test of every row in well under a minute."""
    base = DecodeBenchConfig(new_tokens=(32, 64), repeats=3, uncached_repeats=1, append_lengths=(128, 1024, 8192),
                             append_repeats=1, naive_window=16)
    return dataclasses.replace(base, **changes)


def tiny_config(**changes) -> DecodeBenchConfig:
    """A toy model and tiny sizes for unit tests (a second or two); numbers mean nothing."""
    base = DecodeBenchConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, prompt_len=4, new_tokens=(4, 8),
                             repeats=1, uncached_repeats=1, hf=False, append_lengths=(64, 128), append_repeats=1,
                             naive_window=4, threads=1, progress=False)
    return dataclasses.replace(base, **changes)


# --------------------------------------------------------------------------- caches
class _NaiveCatCache:
    """The textbook first attempt: ``keys = torch.cat([keys, new])`` on every append (O(length))."""

    def __init__(self):
        self.keys: List[torch.Tensor] = []
        self.values: List[torch.Tensor] = []

    def update(self, key, value, layer_idx, cache_position=None):
        if layer_idx == len(self.keys):
            self.keys.append(key)
            self.values.append(value)
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key], dim=2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value], dim=2)
        return self.keys[layer_idx], self.values[layer_idx]


def static_cache_class():
    """``StaticKVCache`` if it can be imported (from ``kv_cache`` or ``kv_cache.basic.static``), else ``None``."""
    cls = getattr(kv_cache, "StaticKVCache", None)
    if cls is not None:
        return cls
    try:
        from kv_cache.basic.static import StaticKVCache
    except Exception:  # noqa: BLE001 -- any import problem means "not available"
        return None
    return StaticKVCache


# --------------------------------------------------------------------------- models
def build_model(cfg: DecodeBenchConfig) -> DecoderOnlyTransformer:
    torch.manual_seed(cfg.seed)
    return DecoderOnlyTransformer(cfg.model_config()).eval()


def build_hf_gpt2(model: DecoderOnlyTransformer):
    """``transformers.GPT2LMHeadModel`` of the same shape, carrying ``model``'s weights."""
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    c = model.config
    hf_config = GPT2Config(n_layer=c.n_layers, n_embd=c.d_model, n_head=c.n_heads, n_inner=c.d_ff,
                           vocab_size=c.vocab_size, n_positions=c.max_seq_len, activation_function="gelu",
                           layer_norm_epsilon=c.norm_eps, bos_token_id=None, eos_token_id=None,
                           tie_word_embeddings=True)
    hf = GPT2LMHeadModel(hf_config)
    hf.config._attn_implementation = "sdpa"
    ours = model.decoder
    tr = hf.transformer
    with torch.no_grad():
        tr.wte.weight.copy_(ours.tok_emb.weight)
        tr.wpe.weight.copy_(ours.pos_emb.weight)
        for blk, h in zip(ours.blocks, tr.h):
            # transformers' Conv1D stores weights as (in, out), like transformer.layers.Linear.
            for src, dst in ((blk.attn.qkv_proj, h.attn.c_attn), (blk.attn.out_proj, h.attn.c_proj),
                             (blk.mlp.fc_in, h.mlp.c_fc), (blk.mlp.fc_out, h.mlp.c_proj)):
                dst.weight.copy_(src.weight)
                dst.bias.copy_(src.bias)
            for src, dst in ((blk.norm1, h.ln_1), (blk.norm2, h.ln_2)):
                dst.weight.copy_(src.weight)
                dst.bias.copy_(src.bias)
        tr.ln_f.weight.copy_(ours.norm_f.weight)
        tr.ln_f.bias.copy_(ours.norm_f.bias)
        if hf.lm_head.weight is not tr.wte.weight:
            hf.lm_head.weight.copy_(ours.lm_head.weight)
    return hf.eval()


def check_uncached_logits(model: DecoderOnlyTransformer, prompt: torch.Tensor) -> Dict[str, Any]:
    """Run a short uncached ``generate`` with a forward hook; report what each call asked for."""
    seen = []

    def hook(_module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        seen.append((int(ids.shape[1]), kwargs.get("num_logits_to_keep", 0), kwargs.get("cache") is not None))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model.generate(prompt, 3, use_cache=False)
    finally:
        handle.remove()
    keep = sorted({k for _, k, _ in seen})
    return {
        "uncached_calls_seq_lens": [s for s, _, _ in seen],
        "uncached_num_logits_to_keep": keep,
        "uncached_uses_no_cache": not any(c for _, _, c in seen),
        "uncached_last_position_only": keep == [1],
    }


# --------------------------------------------------------------------------- decode timing
@dataclass
class _Runner:
    impl: str  # "ours" or "transformers"
    mode: str  # "uncached", "dynamic", "static"
    run: Callable[[], torch.Tensor]
    warm: Callable[[], torch.Tensor]
    repeats: int
    timing: TimingResult = field(default_factory=TimingResult)
    output: Optional[torch.Tensor] = None


def _our_runner(model, prompt, n, mode, cfg) -> _Runner:
    if mode == "uncached":
        def run():
            return model.generate(prompt, n, use_cache=False)

        def warm():
            return model.generate(prompt, min(n, 64), use_cache=False)
        return _Runner("ours", mode, run, warm, cfg.uncached_repeats)
    if mode == "static" and getattr(kv_cache, "StaticKVCache", None) is None:
        # kv_cache does not export it (yet): hand generate a cache object built the same way.
        cls, c = static_cache_class(), model.config

        def run():
            cache = cls(max_cache_len=prompt.shape[1] + n, num_layers=c.n_layers, num_heads=c.n_heads,
                        num_kv_heads=c.n_kv_heads, head_dim=c.head_dim, max_batch_size=prompt.shape[0],
                        dtype=model.decoder.lm_head.weight.dtype)
            return model.generate(prompt, n, cache_implementation=cache)
    else:
        def run():
            return model.generate(prompt, n, cache_implementation=mode)
    return _Runner("ours", mode, run, run, cfg.repeats)


def _hf_runner(hf, prompt, n, mode, cfg) -> _Runner:
    kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)
    if mode == "static":
        kwargs["cache_implementation"] = "static"

    def run():
        return hf.generate(prompt, **kwargs)
    return _Runner("transformers", mode, run, run, cfg.repeats)


def bench_decode(cfg: DecodeBenchConfig, model, prompt, hf, notes: List[str]) -> List[Dict[str, Any]]:
    """Time every implementation at every length; return one row dict per (impl, mode, N)."""
    modes = list(cfg.modes)
    if "static" in modes and static_cache_class() is None:
        modes.remove("static")
        notes.append("StaticKVCache is not importable (kv_cache.basic.static): the 'static' rows were skipped.")
    rows = []
    for n in cfg.new_tokens:
        runners = [_our_runner(model, prompt, n, m, cfg) for m in modes]
        if hf is not None:
            runners.append(_hf_runner(hf, prompt, n, "dynamic", cfg))
            if cfg.hf_static:
                runners.append(_hf_runner(hf, prompt, n, "static", cfg))
        total = sum(1 + r.repeats for r in runners)
        bar = _progress(total, f"decode {n} new tokens", cfg.progress)
        for r in runners:  # warm-up, untimed
            r.warm()
            bar.update()
        for rep in range(max(r.repeats for r in runners)):  # round-robin over the modes
            for r in runners:
                if rep >= r.repeats:
                    continue
                t0 = time.perf_counter()
                r.output = r.run()
                r.timing.samples.append(time.perf_counter() - t0)
                bar.update()
        bar.close()

        uncached = next((r for r in runners if r.mode == "uncached"), None)
        ours_dynamic = next((r for r in runners if r.impl == "ours" and r.mode == "dynamic"), None)
        for r in runners:
            produced = r.output.shape[1] - prompt.shape[1]
            if produced != n:
                notes.append(f"{r.impl} {r.mode} produced {produced} tokens instead of {n}")
            ref = uncached if r.impl == "ours" else ours_dynamic
            same = bool(torch.equal(r.output, ref.output)) if ref is not None and ref is not r else None
            rows.append({
                "impl": r.impl,
                "mode": r.mode,
                "new_tokens": n,
                "tokens_per_s": n / r.timing.median,
                "ms_per_token": 1e3 * r.timing.median / n,
                "runs": len(r.timing.samples),
                "speedup_vs_uncached": (uncached.timing.median / r.timing.median) if uncached is not None else None,
                # ours: same tokens as our uncached reference; transformers: same tokens as our dynamic run
                "same_tokens_as_reference": same,
                "timing": r.timing.to_dict(),
            })
    return rows


def ours_vs_hf(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Pair our cached modes with transformers' (dynamic-dynamic, static-static, static-dynamic)."""
    by_key = {(r["impl"], r["mode"], r["new_tokens"]): r for r in rows}
    out = []
    for n in sorted({r["new_tokens"] for r in rows}):
        for ours_mode, hf_mode in (("dynamic", "dynamic"), ("static", "static"), ("static", "dynamic")):
            a, b = by_key.get(("ours", ours_mode, n)), by_key.get(("transformers", hf_mode, n))
            if a and b:
                out.append({"new_tokens": n, "ours_mode": ours_mode, "hf_mode": hf_mode,
                            "ours_tokens_per_s": a["tokens_per_s"], "hf_tokens_per_s": b["tokens_per_s"],
                            "ours_over_hf": a["tokens_per_s"] / b["tokens_per_s"]})
    return out


# --------------------------------------------------------------------------- append timing
def _time_appends(make_cache: Callable[[int], Any], length: int, window: int, heads: int, head_dim: int,
                  repeats: int) -> Dict[str, Any]:
    """Fill a fresh cache to ``length``, then time ``window`` single-token appends, ``repeats`` times."""
    pooled, means, max_capacity = [], [], None
    gen = torch.Generator().manual_seed(length)
    fill_k = torch.randn(1, heads, length, head_dim, generator=gen)
    fill_v = torch.randn(1, heads, length, head_dim, generator=gen)
    k = torch.randn(1, heads, 1, head_dim, generator=gen)
    v = torch.randn(1, heads, 1, head_dim, generator=gen)
    for _ in range(repeats):
        cache = make_cache(2 * length)
        cache.update(fill_k, fill_v, 0)
        times = [0.0] * window
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            clock = time.perf_counter_ns
            for i in range(window):
                t0 = clock()
                cache.update(k, v, 0)
                times[i] = (clock() - t0) * 1e-9
        finally:
            if gc_was_enabled:
                gc.enable()
        max_capacity = cache.keys[0].shape[2]  # allocated token slots (== length for torch.cat)
        pooled.extend(times)
        means.append(sum(times) / window)
        del cache
    return {
        "appends_timed": window,
        "median_us": 1e6 * statistics.median(pooled),
        "amortised_mean_us": 1e6 * statistics.median(means),
        "max_us": 1e6 * max(pooled),
        "capacity_after": max_capacity,
    }


def bench_appends(cfg: DecodeBenchConfig, notes: List[str]) -> List[Dict[str, Any]]:
    """Per-append cost of each cache at each length (see the module docstring for the protocol)."""
    mc = cfg.model_config()
    heads, head_dim = mc.n_kv_heads, mc.head_dim
    static_cls = static_cache_class()
    caches: List[Tuple[str, Callable[[int], Any], Callable[[int], int]]] = [
        ("dynamic", lambda cap: DynamicKVCache(), lambda L: L),
    ]
    if static_cls is not None:
        caches.append(("static", lambda cap: static_cls(max_cache_len=cap, num_layers=1, num_heads=heads,
                                                         head_dim=head_dim), lambda L: L))
    elif not any("StaticKVCache" in n for n in notes):
        notes.append("StaticKVCache is not importable (kv_cache.basic.static): the 'static' rows were skipped.")
    caches.append(("naive torch.cat", lambda cap: _NaiveCatCache(), lambda L: min(L, cfg.naive_window)))

    rows = []
    bar = _progress(len(caches) * len(cfg.append_lengths), "cache appends", cfg.progress)
    for name, make, window_of in caches:
        _time_appends(make, 64, 64, heads, head_dim, 1)  # warm-up
        first = None
        for L in cfg.append_lengths:
            r = _time_appends(make, L, window_of(L), heads, head_dim, cfg.append_repeats)
            r = {"cache": name, "length": L, **r}
            first = first or r
            r["median_ratio_vs_first"] = r["median_us"] / first["median_us"]
            r["mean_ratio_vs_first"] = r["amortised_mean_us"] / first["amortised_mean_us"]
            rows.append(r)
            bar.update()
    bar.close()
    return rows


# --------------------------------------------------------------------------- orchestration
def run_decode_benchmark(cfg: DecodeBenchConfig) -> Dict[str, Any]:
    """Run every measurement of ``cfg`` and return a JSON-able dict (no printing).

    Keys: ``config``, ``threads``, ``model`` (parameter count), ``checks``, ``decode`` (one row
    per implementation/mode/length), ``ours_vs_hf``, ``append`` (one row per cache/length),
    ``targets`` and ``notes``.
    """
    previous_threads = torch.get_num_threads()
    threads = set_threads(cfg.threads)
    try:
        return _run(cfg, threads)
    finally:
        torch.set_num_threads(previous_threads)  # leave the process as we found it (tests, notebooks)


def _run(cfg: DecodeBenchConfig, threads: int) -> Dict[str, Any]:
    torch.manual_seed(cfg.seed)
    notes: List[str] = []
    model = build_model(cfg)
    prompt = torch.randint(0, cfg.vocab_size, (1, cfg.prompt_len), generator=torch.Generator().manual_seed(cfg.seed))
    hf = None
    if cfg.hf:
        try:
            hf = build_hf_gpt2(model)
        except ImportError:
            notes.append("transformers is not importable: the comparison rows were skipped "
                         "(pip install transformers to include them; the project never depends on it).")
    with torch.inference_mode():
        checks = check_uncached_logits(model, prompt)
        if not checks["uncached_last_position_only"]:
            notes.append(f"WARNING: the uncached reference asked for num_logits_to_keep="
                         f"{checks['uncached_num_logits_to_keep']}, not [1]: it computes logits it never uses.")
        decode = bench_decode(cfg, model, prompt, hf, notes)
        append = bench_appends(cfg, notes)
    vs = ours_vs_hf(decode)
    result = {
        "config": dataclasses.asdict(cfg),
        "threads": threads,
        "model": {"parameters": model.num_parameters(), **model.config.to_dict()},
        "checks": checks,
        "decode": decode,
        "ours_vs_hf": vs,
        "append": append,
        "notes": notes,
    }
    result["targets"] = evaluate_targets(result)
    return result


def evaluate_targets(result: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The project's performance targets, each with the measured value and whether it is met."""
    out = []
    decode = result["decode"]
    if decode:
        n = max(r["new_tokens"] for r in decode)
        for r in decode:
            if r["impl"] == "ours" and r["mode"] != "uncached" and r["new_tokens"] == n and r["speedup_vs_uncached"]:
                out.append({"target": f"{r['mode']} cache >= {SPEEDUP_TARGET:g}x uncached at {n} new tokens",
                            "value": r["speedup_vs_uncached"], "met": r["speedup_vs_uncached"] >= SPEEDUP_TARGET})
    for p in result["ours_vs_hf"]:
        if p["ours_mode"] == p["hf_mode"]:
            out.append({"target": f"ours {p['ours_mode']} >= transformers {p['hf_mode']} at {p['new_tokens']} tokens",
                        "value": p["ours_over_hf"], "met": p["ours_over_hf"] >= 1.0})
    for r in result["append"]:
        if r["cache"] in ("dynamic", "static") and r["length"] == max(x["length"] for x in result["append"]):
            first = min(x["length"] for x in result["append"])
            for stat, key in (("median", "median_ratio_vs_first"), ("amortised mean", "mean_ratio_vs_first")):
                out.append({"target": f"{r['cache']} append {stat} at {r['length']} <= "
                                      f"{APPEND_RATIO_TARGET:g}x that at {first}",
                            "value": r[key], "met": r[key] <= APPEND_RATIO_TARGET})
    return out


def _table(rows, headers, title, floatfmt=".4g") -> str:
    return f"### {title}\n\n" + markdown_table(rows, headers, floatfmt)


def render(result: Dict[str, Any], machine: Dict[str, Any], file=None) -> str:
    """Print the tables of ``result`` (markdown) and return them as one string."""
    parts = []

    def emit(text):
        print(text + "\n", file=file or sys.stdout, flush=True)
        parts.append(text)

    cfg, m = result["config"], result["model"]
    emit("## Decode benchmark (CPU)")
    emit(f"Machine: {format_machine(machine)}\n\n"
         f"`torch.set_num_threads({result['threads']})`. Model: d_model={m['d_model']}, n_layers={m['n_layers']}, "
         f"n_heads={m['n_heads']}, vocab={m['vocab_size']}, {m['parameters'] / 1e6:.2f}M parameters, fp32, "
         f"batch 1, prompt {cfg['prompt_len']} tokens, greedy. Median of {cfg['repeats']} timed runs "
         f"({cfg['uncached_repeats']} for uncached) after one warm-up.")
    if result.get("load_average_before"):
        emit(f"Load average (1/5/15 min) before the run: {result['load_average_before']}; after: "
             f"{machine.get('load_average')} (this run adds about its thread count).")
    ck = result["checks"]
    emit(f"Uncached reference: `num_logits_to_keep` = {ck['uncached_num_logits_to_keep']} "
         f"(last position only: {'yes' if ck['uncached_last_position_only'] else 'NO'}), "
         f"sequence lengths of the first calls {ck['uncached_calls_seq_lens']}.")

    emit(_table(
        [[r["new_tokens"], r["impl"], r["mode"], round(r["tokens_per_s"], 1), round(r["ms_per_token"], 3), r["runs"],
          f"{r['speedup_vs_uncached']:.1f}x" if r["speedup_vs_uncached"] else "-",
          r["same_tokens_as_reference"]] for r in result["decode"]],
        ["new tokens", "implementation", "cache", "tokens/s", "ms/token", "runs", "speedup vs uncached",
         "same tokens"],
        title="Greedy decoding throughput", floatfmt=".4g"))
    if result["ours_vs_hf"]:
        emit(_table(
            [[p["new_tokens"], p["ours_mode"], p["hf_mode"], round(p["ours_tokens_per_s"], 1),
              round(p["hf_tokens_per_s"], 1), f"{p['ours_over_hf']:.2f}"] for p in result["ours_vs_hf"]],
            ["new tokens", "ours", "transformers", "ours tokens/s", "transformers tokens/s", "ours / theirs"],
            title="Ours vs transformers GPT-2 (same shape, same weights)", floatfmt=".4g"))
    emit(_table(
        [[r["cache"], r["length"], r["appends_timed"], round(r["median_us"], 2), round(r["amortised_mean_us"], 2),
          round(r["max_us"], 1), f"{r['median_ratio_vs_first']:.2f}", f"{r['mean_ratio_vs_first']:.2f}"]
         for r in result["append"]],
        ["cache", "length L", "appends timed", "median µs", "amortised mean µs", "max µs", "median / first",
         "mean / first"],
        title="One single-token append (one layer), from length L", floatfmt=".4g"))
    if result["targets"]:
        emit(_table([[t["target"], round(t["value"], 2), t["met"]] for t in result["targets"]],
                    ["target", "measured", "met"], title="Targets"))
    if result["notes"]:
        emit("Notes:\n" + "\n".join(f"- {n}" for n in result["notes"]))
    return "\n\n".join(parts)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.decode_benchmark",
        description="Time greedy decoding without a cache, with the dynamic and static KV caches and (if "
                    "installed) with transformers' GPT-2, plus the cost of a single cache append. Prints "
                    "markdown tables and writes JSON (+ a .md copy of the tables).")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 32/64 new tokens, 3 append lengths, fewer repeats (well under a minute)")
    p.add_argument("--out", default=None,
                   help=f"JSON file to write (default {DEFAULT_OUT}, or {QUICK_OUT} with --quick); "
                        f"the tables go next to it with a .md suffix")
    p.add_argument("--new-tokens", type=int_list, default=None, metavar="N[,N...]",
                   help="decode lengths to time (default 256,1024; --quick: 32,64)")
    p.add_argument("--append-lengths", type=int_list, default=None, metavar="L[,L...]",
                   help="cache lengths for the append benchmark (default 128,256,...,8192)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per cached mode (default 3; median reported)")
    p.add_argument("--uncached-repeats", type=int, default=None,
                   help="timed runs of the slow uncached mode (default 1)")
    p.add_argument("--append-repeats", type=int, default=None, help="fresh caches per append measurement (default 3)")
    p.add_argument("--naive-window", type=int, default=None,
                   help="appends timed per length for the naive torch.cat cache (default 32; each costs O(L))")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all available cores)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers GPT-2 comparison")
    p.add_argument("--no-uncached", action="store_true", help="skip the (slow) uncached reference")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and prompt (default 0)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> DecodeBenchConfig:
    cfg = quick_config() if args.quick else DecodeBenchConfig()
    changes: Dict[str, Any] = {"seed": args.seed, "progress": not args.no_progress, "threads": args.threads}
    for name in ("new_tokens", "append_lengths", "repeats", "uncached_repeats", "append_repeats", "naive_window"):
        value = getattr(args, name)
        if value is not None:
            if isinstance(value, int) and value < 1:
                raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {value}")
            changes[name] = value
    if args.no_hf:
        changes["hf"] = False
    if args.no_uncached:
        changes["modes"] = tuple(m for m in cfg.modes if m != "uncached")
    return dataclasses.replace(cfg, **changes)


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    cfg = config_from_args(args)
    set_threads(cfg.threads)
    print(f"torch.set_num_threads({torch.get_num_threads()})  (cores available: "
          f"{machine_description()['available_cores']})", flush=True)
    load_before = load_average()
    if load_before and load_before[0] > 0.5:
        print(f"note: load average {load_before[0]:g} before the run -- other processes are using the CPU; "
              f"timings will be noisy (with as many threads as cores, much slower)", flush=True)
    result = run_decode_benchmark(cfg)
    result["load_average_before"] = load_before
    machine = machine_description()
    text = render(result, machine)
    out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    path = write_results(out, result, machine=machine,
                         command="python -m benchmarks.decode_benchmark " + " ".join(sys.argv[1:] if argv is None
                                                                                    else argv),
                         markdown=text)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
