"""How much KV memory does paging save, how many more requests fit, and what does prefix sharing save?

Run from the repository root::

    python -m benchmarks.paged_memory_benchmark            # full run (about a minute on 2 cores)
    python -m benchmarks.paged_memory_benchmark --quick    # smoke test, a few seconds
    python -m benchmarks.paged_memory_benchmark --help

It prints GitHub-markdown tables (machine description first) and saves the numbers as JSON
(``--out``, default ``benchmarks/results/paged_memory_cpu.json``) with the tables next to it
(``.md``).

What is measured
================

1. **Serving simulation (memory).**  ``--requests`` requests (default 300, seeded) with
   ShareGPT-like lengths: prompt and output lengths drawn log-normally (medians
   ``--prompt-median`` 128 and ``--output-median`` 192 tokens, clipped to ``[4, 1024]``); the
   model context is ``--max-len`` 2,048 tokens.  All requests are queued at once and served by
   *continuous batching*: every step admits waiting requests first-come-first-served while
   memory allows, writes each admitted prompt's keys/values (the prefill), then appends one
   token to every running request; a request leaves when its output is complete.  The KV
   memory budget is ``--budget-seqs`` (16) max-length sequences.  Two ways to hold memory, both
   the real :class:`kv_cache.AdvancedKVCache` (1 layer, 1 head of dim 8: the data is tiny, the
   book-keeping is the real one):

   * ``reserve max length`` -- ``use_memory_pool=False``: each request reserves
     ``max_len`` tokens on admission, as servers did before PagedAttention;
   * ``paged`` -- ``use_memory_pool=True``, ``--block-size`` 16: blocks are taken as tokens
     arrive.  Admission keeps a 1% watermark of free blocks; if the pool still runs out, the
     manager's ``LRU`` policy evicts a request (decoding visits requests newest first, so the
     newest one is least recently used -- vLLM's choice) and it is re-queued to recompute.

   Reported: **waste** = reserved-but-unused fraction of the memory held, averaged over steps
   (``1 - sum(tokens stored) / sum(slots reserved)``); requests in flight (mean / max); decode
   steps to finish the workload; preemptions.  The manager's own ``usage()`` is checked
   against the simulation's counts along the way.

2. **Prefix sharing (prefill time).**  ``--prefix-requests`` requests (16) share a
   ``--system-len`` (384) token system prompt followed by a distinct 16-64-token question.
   A small ``DecoderOnlyTransformer`` (d_model 256, 4 layers, 4 heads, RoPE, random weights,
   fp32, CPU, ``torch.inference_mode``) prefills them one after another into an
   ``AdvancedKVCache`` through a ``PagedCacheView`` -- once with ``enable_prefix_caching=False``
   (every token computed), once with it on (``add_sequence(id, token_ids)`` finds the system
   prompt's full blocks; only the rest is computed).  One untimed warm-up of each mode, then
   ``--repeats`` (3) timed runs round-robin; **the median** is reported.  The last-position
   logits of the two modes are compared (max absolute difference) and the blocks held are
   reported (sharing also saves the memory).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from kv_cache import AdvancedKVCache, CacheConfig, PagedCacheView
from transformer import DecoderOnlyTransformer, ModelConfig

from .common import format_machine, load_average, machine_description, markdown_table, set_threads, write_results

try:  # progress bar is a nicety, never a requirement (plain tqdm: also quiet inside notebooks)
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

DEFAULT_OUT = "benchmarks/results/paged_memory_cpu.json"
QUICK_OUT = "benchmarks/results/paged_memory_cpu_quick.json"
SIM_HEAD_DIM = 8  # the simulated cache: 1 layer, 1 kv head of this size (only the book-keeping matters)


@dataclass
class PagedBenchConfig:
    """Everything the benchmark varies.  ``quick_config()`` is the smoke-test preset."""

    requests: int = 300
    prompt_median: int = 128
    output_median: int = 192
    max_len: int = 2048
    budget_seqs: int = 16
    block_size: int = 16
    prefix_requests: int = 16
    system_len: int = 384
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    repeats: int = 3
    threads: Optional[int] = None
    seed: int = 0
    progress: bool = True

    @property
    def budget_tokens(self) -> int:
        return self.budget_seqs * self.max_len


def quick_config(**changes) -> PagedBenchConfig:
    """Small sizes for a smoke test (a few seconds); the numbers only show the shape of the result."""
    base = PagedBenchConfig(requests=40, prompt_median=48, output_median=48, max_len=512, budget_seqs=4,
                            prefix_requests=3, system_len=64, d_model=64, n_layers=2, n_heads=2, repeats=1)
    return dataclasses.replace(base, **changes)


# --------------------------------------------------------------------------------- workload
def make_workload(cfg: PagedBenchConfig) -> List[Tuple[int, int]]:
    """``(prompt_len, output_len)`` per request: log-normal (sigma 1), clipped to ``[4, 1024]``
    and to ``max_len`` in total.  Seeded."""
    rng = random.Random(cfg.seed)
    cap = min(1024, cfg.max_len // 2)
    out = []
    for _ in range(cfg.requests):
        p = int(min(cap, max(4, rng.lognormvariate(math.log(cfg.prompt_median), 1.0))))
        o = int(min(cap, max(4, rng.lognormvariate(math.log(cfg.output_median), 1.0))))
        out.append((p, o))
    return out


def simulate(workload: List[Tuple[int, int]], cfg: PagedBenchConfig, paged: bool) -> Dict[str, Any]:
    """Serve ``workload`` with continuous batching under the budget; see the module docstring."""
    bytes_per_token = 2 * SIM_HEAD_DIM * 4
    manager = AdvancedKVCache(CacheConfig(
        max_batch_size=len(workload), max_sequence_length=cfg.max_len, embed_dim=SIM_HEAD_DIM, num_heads=1,
        num_layers=1, eviction_policy="lru", memory_limit_mb=cfg.budget_tokens * bytes_per_token / 2 ** 20,
        preallocate_memory=True, use_memory_pool=paged, block_size=cfg.block_size, enable_prefix_caching=False))
    bs, pool = cfg.block_size, manager.pool
    watermark = max(1, pool.max_blocks // 100) if paged else 0
    zeros = torch.zeros(cfg.max_len, 1, SIM_HEAD_DIM)
    waiting, running = deque(range(len(workload))), []
    generated, length = [0] * len(workload), [0] * len(workload)
    steps = preemptions = recomputed = 0
    filled_sum = reserved_sum = in_flight_sum = max_in_flight = 0
    bar = tqdm(total=len(workload), desc="paged" if paged else "reserve", leave=False, file=sys.stderr) \
        if cfg.progress and tqdm is not None else None
    start = time.perf_counter()
    while waiting or running:
        while waiting:  # admit first-come-first-served while memory allows
            rid = waiting[0]
            need = workload[rid][0] + generated[rid]  # a preempted request recomputes what it had
            blocks = -(-(need + 1) // bs) + watermark if paged else cfg.max_len // bs
            if pool.num_free < blocks:
                if not running:
                    raise RuntimeError(f"request {rid} needs {blocks} blocks but the whole budget is "
                                       f"{pool.max_blocks}; raise --budget-seqs")
                break
            waiting.popleft()
            manager.add_sequence(rid)
            manager.append_cache(0, rid, zeros[:need], zeros[:need])
            length[rid] = need
            recomputed += generated[rid]
            running.append(rid)
        for rid in reversed(running):  # decode one token each, newest first
            if rid in manager:
                manager.append_cache(0, rid, zeros[:1], zeros[:1])
                generated[rid] += 1
                length[rid] += 1
        evicted = [rid for rid in running if rid not in manager]
        for rid in reversed(evicted):
            waiting.appendleft(rid)
        preemptions += len(evicted)
        running = [rid for rid in running if rid in manager]
        filled = sum(length[r] for r in running)
        reserved = pool.num_used * bs
        if steps % 64 == 0:  # the numbers come from the manager, not just from this loop
            usage = manager.usage()
            assert (usage["filled_slots"], usage["reserved_slots"]) == (filled, reserved), (usage, filled, reserved)
        filled_sum, reserved_sum = filled_sum + filled, reserved_sum + reserved
        in_flight_sum, max_in_flight = in_flight_sum + len(running), max(max_in_flight, len(running))
        for rid in [r for r in running if generated[r] >= workload[r][1]]:
            manager.clear_sequence(rid)
            running.remove(rid)
            if bar is not None:
                bar.update(1)
        steps += 1
    if bar is not None:
        bar.close()
    assert manager.memory_bytes() <= manager.config.memory_limit_mb * 2 ** 20
    return dict(mode="paged" if paged else "reserve max length", block_size=bs, steps=steps,
                waste=1 - filled_sum / reserved_sum, utilization=filled_sum / (steps * cfg.budget_tokens),
                mean_in_flight=in_flight_sum / steps, max_in_flight=max_in_flight, preemptions=preemptions,
                recomputed_tokens=recomputed, seconds=time.perf_counter() - start,
                pool_hit_rate=manager.get_global_stats()["memory_pool"]["pool_hit_rate"])


def fit_counts(workload, cfg: PagedBenchConfig) -> Dict[str, Any]:
    """How many requests of the workload fit the budget at once, each at its final length."""
    per_request = [-(-(p + o) // cfg.block_size) * cfg.block_size for p, o in workload]
    used = n = 0
    for tokens in per_request:
        if used + tokens > cfg.budget_tokens:
            break
        used, n = used + tokens, n + 1
    return dict(budget_tokens=cfg.budget_tokens, reserve_max_length=cfg.budget_tokens // cfg.max_len, paged=n,
                mean_final_length=statistics.fmean(p + o for p, o in workload))


# --------------------------------------------------------------------------------- prefix sharing
def bench_prefix(cfg: PagedBenchConfig) -> Dict[str, Any]:
    """Prefill time of requests sharing a system prompt, with and without reusing its blocks."""
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    vocab = 2048
    system = torch.randint(0, vocab, (cfg.system_len,), generator=g)
    requests = [torch.cat([system, torch.randint(0, vocab, (int(torch.randint(16, 65, (1,), generator=g)),),
                                                 generator=g)]) for _ in range(cfg.prefix_requests)]
    longest = max(len(r) for r in requests)
    model = DecoderOnlyTransformer(ModelConfig(vocab_size=vocab, d_model=cfg.d_model, n_layers=cfg.n_layers,
                                               n_heads=cfg.n_heads, max_seq_len=longest, pos_encoding="rope")).eval()
    c = model.config
    tokens_total = sum(len(r) for r in requests)
    memory_mb = 2 * (tokens_total + 16 * len(requests)) * 2 * c.n_layers * c.d_model * 4 / 2 ** 20

    def run(share: bool):
        manager = AdvancedKVCache(CacheConfig(
            max_batch_size=len(requests), max_sequence_length=longest, embed_dim=c.d_model, num_heads=c.n_heads,
            num_layers=c.n_layers, memory_limit_mb=memory_mb, eviction_policy="none", preallocate_memory=True,
            block_size=cfg.block_size, enable_prefix_caching=share))
        last_logits, prefilled = [], 0
        with torch.inference_mode():
            start = time.perf_counter()
            for i, ids in enumerate(requests):
                n = manager.add_sequence(i, ids.tolist())
                with PagedCacheView(manager, [i]) as view:
                    last_logits.append(model(ids[None, n:], cache=view, num_logits_to_keep=1)[0, -1])
                prefilled += len(ids) - n
            seconds = time.perf_counter() - start
        return seconds, prefilled, torch.stack(last_logits), manager.pool.num_used

    for share in (False, True):  # warm-up
        run(share)
    samples = {False: [], True: []}
    for _ in range(cfg.repeats):  # round-robin: a burst of background load hits both modes
        for share in (False, True):
            seconds, prefilled, logits, blocks = run(share)
            samples[share].append(seconds)
            if share:
                shared_out = (prefilled, logits, blocks)
            else:
                full_out = (prefilled, logits, blocks)
    rows = []
    for share, (prefilled, logits, blocks) in ((False, full_out), (True, shared_out)):
        med = statistics.median(samples[share])
        rows.append(dict(mode="prefix sharing" if share else "no sharing", tokens_prefilled=prefilled,
                         tokens_total=tokens_total, median_s=med, ms_per_request=1000 * med / len(requests),
                         samples_s=samples[share], blocks_held=blocks))
    rows[1]["speedup"] = rows[0]["median_s"] / rows[1]["median_s"]
    rows[0]["speedup"] = 1.0
    return dict(rows=rows, max_abs_logit_diff=float((full_out[1] - shared_out[1]).abs().max()),
                ideal_speedup=tokens_total / shared_out[0], system_len=cfg.system_len, requests=len(requests),
                model=dict(d_model=c.d_model, n_layers=c.n_layers, n_heads=c.n_heads, vocab_size=vocab))


# --------------------------------------------------------------------------------- driver
def run_paged_benchmark(cfg: PagedBenchConfig) -> Dict[str, Any]:
    """Both parts; returns a JSON-able dict (``config``, ``workload``, ``fit``, ``simulation``,
    ``prefix``).  torch's thread count is set for the run and restored afterwards."""
    before = torch.get_num_threads()
    try:
        threads = set_threads(cfg.threads)
        workload = make_workload(cfg)
        sim = [simulate(workload, cfg, paged=False), simulate(workload, cfg, paged=True)]
        prefix = bench_prefix(cfg)
    finally:
        torch.set_num_threads(before)
    return dict(config=dataclasses.asdict(cfg), threads=threads, workload=dict(
        requests=len(workload), mean_prompt=statistics.fmean(p for p, _ in workload),
        mean_output=statistics.fmean(o for _, o in workload), max_len=cfg.max_len),
        fit=fit_counts(workload, cfg), simulation=sim, prefix=prefix)


def render(result: Dict[str, Any], machine: Dict[str, Any], file=None) -> str:
    """The markdown report (printed, and returned for the ``.md`` file)."""
    cfg, w, fit, px = result["config"], result["workload"], result["fit"], result["prefix"]
    parts = [f"## Paged KV memory benchmark\n\nMachine: {format_machine(machine)}\n",
             f"### Serving {w['requests']} requests from one KV budget\n\n"
             f"Mean prompt {w['mean_prompt']:.0f} tokens, mean output {w['mean_output']:.0f} tokens, context "
             f"{w['max_len']} tokens; budget {fit['budget_tokens']} tokens = {cfg['budget_seqs']} max-length "
             f"sequences; block size {cfg['block_size']}.\n",
             markdown_table([[r["mode"], round(100 * r["waste"], 1), round(100 * r["utilization"], 1),
                              round(r["mean_in_flight"], 1), r["max_in_flight"], r["steps"], r["preemptions"],
                              r["recomputed_tokens"]] for r in result["simulation"]],
                            ["KV memory", "reserved but unused (%)", "budget holding tokens (%)",
                             "requests in flight (mean)", "in flight (max)", "decode steps to finish", "preemptions",
                             "tokens recomputed"], floatfmt=".4g"),
             f"\nRequests that fit the budget at once, each at its final length: "
             f"**{fit['reserve_max_length']}** reserving max length vs **{fit['paged']}** paged "
             f"(mean final length {fit['mean_final_length']:.0f} tokens).\n",
             f"### Prefill of {px['requests']} requests sharing a {px['system_len']}-token system prompt\n\n"
             f"DecoderOnlyTransformer d_model {px['model']['d_model']}, {px['model']['n_layers']} layers, "
             f"{px['model']['n_heads']} heads, fp32, {result['threads']} thread(s); median of "
             f"{cfg['repeats']} run(s).\n",
             markdown_table([[r["mode"], r["tokens_prefilled"], r["tokens_total"], round(1000 * r["median_s"], 1),
                              round(r["ms_per_request"], 2), round(r["speedup"], 2), r["blocks_held"]]
                             for r in px["rows"]],
                            ["mode", "tokens prefilled", "tokens in prompts", "total ms", "ms / request", "speedup (x)",
                             "KV blocks held"], floatfmt=".4g"),
             f"\nMax |logit difference| between the modes: {px['max_abs_logit_diff']:.2e}; the ideal speedup "
             f"(tokens in prompts / tokens prefilled) is {px['ideal_speedup']:.2f}x."]
    text = "\n".join(parts)
    print(text + "\n", file=file or sys.stdout, flush=True)
    return text


def parse_args(argv=None) -> argparse.Namespace:
    d = PagedBenchConfig()
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.paged_memory_benchmark",
        description="Measure KV memory waste and requests in flight with and without paging (a seeded serving "
                    "simulation), and the prefill time prefix sharing saves (a small model on CPU).")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test in a few seconds")
    p.add_argument("--out", default=None, help=f"JSON file to write (default {DEFAULT_OUT}, or {QUICK_OUT} with "
                                               f"--quick); the tables go next to it as .md")
    for name, help_text in (("requests", "requests in the serving simulation"),
                            ("prompt-median", "median prompt length (tokens)"),
                            ("output-median", "median output length (tokens)"),
                            ("max-len", "model context = what a reservation sizes for"),
                            ("budget-seqs", "KV budget, in max-length sequences"),
                            ("block-size", "tokens per block of the paged pool"),
                            ("prefix-requests", "requests sharing the system prompt"),
                            ("system-len", "tokens in the shared system prompt"),
                            ("repeats", "timed runs of each prefix mode (median reported)")):
        attr = name.replace("-", "_")
        p.add_argument(f"--{name}", type=int, default=None, help=f"{help_text} (default {getattr(d, attr)})")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all available cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the workload and the weights (default 0)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = p.parse_args(argv)
    for name in ("requests", "prompt_median", "output_median", "max_len", "budget_seqs", "block_size",
                 "prefix_requests", "system_len", "repeats"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive int, got {v}")
    return args


def config_from_args(args: argparse.Namespace) -> PagedBenchConfig:
    cfg = quick_config() if args.quick else PagedBenchConfig()
    changes = {k: getattr(args, k) for k in ("requests", "prompt_median", "output_median", "max_len", "budget_seqs",
                                             "block_size", "prefix_requests", "system_len", "repeats", "threads")
               if getattr(args, k) is not None}
    return dataclasses.replace(cfg, seed=args.seed, progress=not args.no_progress, **changes)


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    cfg = config_from_args(args)
    set_threads(cfg.threads)  # so that the machine line below reports the threads the run used
    load_before = load_average()
    if load_before and load_before[0] > 0.5:
        print(f"note: load average {load_before[0]:g} before the run -- other processes are using the CPU; "
              f"the prefill timings will be noisy", flush=True)
    result = run_paged_benchmark(cfg)
    result["load_average_before"] = load_before
    machine = machine_description()
    text = render(result, machine)
    out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    path = write_results(out, result, machine=machine, markdown=text, command="python -m "
                         "benchmarks.paged_memory_benchmark " + " ".join(sys.argv[1:] if argv is None else argv))
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
