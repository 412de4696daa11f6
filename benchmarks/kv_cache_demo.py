"""The classic KV-cache demo: greedy generation with and without the cache, timed and plotted.

Run from the repository root::

    python -m benchmarks.kv_cache_demo                      # lengths 10 20 50 100, about a minute or less
    python -m benchmarks.kv_cache_demo --seq-lengths 10 50 200 --num-runs 3 --out speed.png
    python -m benchmarks.kv_cache_demo --help

or from Python (the API of the tutorial this repository answers)::

    from benchmarks.kv_cache_demo import benchmark_comparison, plot_benchmark_results
    results = benchmark_comparison(seq_lengths=[10, 20, 50, 100], batch_size=2, num_runs=5)
    plot_benchmark_results(results)                          # writes kv_cache_benchmark.png

What is measured
================

An :class:`~transformer.EnhancedTransformer` encoder-decoder with random weights (seeded):
vocabularies of 1,000, ``d_model=256``, 8 heads, ``d_ff=1024``, 4 encoder and 4 decoder
layers, fp32, eval mode.  For each length ``L`` a batch of ``batch_size`` random sources of
``L`` tokens is decoded greedily (``temperature=0``) with ``max_length=L`` -- BOS plus ``L - 1``
new tokens, never stopping early (``eos_token_id=None``) -- twice:

* ``use_cache=True``: the encoder runs once; each step feeds one token through the decoder,
  whose self-attention cache grows by one token and whose cross-attention keys/values of the
  source are projected on the first step only;
* ``use_cache=False``: each step reruns the decoder over the whole target so far (and
  re-projects the source in every cross-attention layer).

Each mode gets ``warmup`` untimed calls, then ``num_runs`` timed calls; the **mean** and the
standard deviation of those calls are reported, and ``speedup = uncached mean / cached mean``.
Without a cache step ``t`` costs ``O(t)`` decoder work, so the uncached time grows about
quadratically with ``L`` and the cached time about linearly: the speedup grows with ``L``.

The numbers depend on the machine and on ``torch.set_num_threads`` (printed with the table;
``--threads 1`` is steadier on a machine whose cores other processes share).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import torch
from tqdm import tqdm

from transformer import EnhancedTransformer
from transformer.data import FIRST_SYMBOL

from .common import format_machine, machine_description, print_table, set_threads, time_fn, write_results

#: The demo model's shape (the ``EnhancedTransformer`` constructor's arguments).
DEFAULT_MODEL: Dict[str, Any] = dict(src_vocab_size=1000, tgt_vocab_size=1000, d_model=256, num_heads=8,
                                     d_ff=1024, num_layers=4, max_seq_len=512, dropout=0.0)
DEFAULT_OUT = "benchmarks/results/kv_cache_demo.png"
MODES = ("cached", "uncached")


def build_demo_model(seed: int = 0, device: Union[str, torch.device] = "cpu", **overrides) -> EnhancedTransformer:
    """The demo's ``EnhancedTransformer`` with seeded random weights, in eval mode.

    ``overrides`` replace entries of :data:`DEFAULT_MODEL` (e.g. ``d_model=64`` for a quick run).
    """
    torch.manual_seed(seed)
    return EnhancedTransformer(**{**DEFAULT_MODEL, **overrides}).to(device).eval()


def _check_args(seq_lengths, batch_size, num_runs, max_seq_len) -> list:
    lengths = list(seq_lengths)
    if not lengths or any(not isinstance(L, int) or isinstance(L, bool) or L < 2 for L in lengths):
        raise ValueError(f"seq_lengths must be a non-empty sequence of ints >= 2 (max_length counts the BOS "
                         f"token, so 2 is the shortest that generates anything), got {seq_lengths!r}")
    if max(lengths) > max_seq_len:
        raise ValueError(f"seq_lengths go up to {max(lengths)}, beyond the model's max_seq_len={max_seq_len}")
    for name, value in (("batch_size", batch_size), ("num_runs", num_runs)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return lengths


def benchmark_comparison(seq_lengths: Sequence[int] = (10, 20, 50, 100), batch_size: int = 2, num_runs: int = 5,
                         model: Optional[EnhancedTransformer] = None, device: Union[str, torch.device] = "cpu", *,
                         warmup: int = 1, threads: Optional[int] = None, seed: int = 0,
                         progress: bool = True) -> Dict[str, Any]:
    """Time greedy generation with and without the KV cache at each length.

    Args:
        seq_lengths: values of ``max_length`` (BOS included) and of the source length.
        batch_size: sources decoded together.
        num_runs: timed calls per length and mode (after ``warmup`` untimed ones).
        model: an ``EnhancedTransformer`` (or any model with its ``generate``); ``None`` builds
            :func:`build_demo_model`.  A given model is moved to ``device``.
        device: where the model and the sources live.
        threads: ``torch.set_num_threads`` for the run (restored afterwards); ``None`` keeps
            the current setting.
        seed: seed of the sources (and of the weights when ``model`` is ``None``).
        progress: show a tqdm progress bar.

    Returns a JSON-able dict: ``settings`` (the arguments, the model's shape and the thread
    count), ``seq_lengths`` and ``results``, which maps each length ``L`` to
    ``{"new_tokens": L - 1, "cached": {...}, "uncached": {...}, "speedup": float}``; each mode
    holds ``mean_s``, ``std_s`` (0 for a single run), ``samples_s`` and ``ms_per_token`` (mean
    time / new tokens).
    """
    previous_threads = torch.get_num_threads()
    if threads is not None:
        set_threads(threads)
    try:
        if model is None:
            model = build_demo_model(seed=seed, device=device)
        model = model.to(device).eval()
        lengths = _check_args(seq_lengths, batch_size, num_runs, model.config.max_seq_len)
        cfg = model.config
        settings = {
            "batch_size": batch_size, "num_runs": num_runs, "warmup": warmup, "device": str(device),
            "threads": torch.get_num_threads(), "seed": seed, "decoding": "greedy (temperature=0), no early stop",
            "model": {"class": type(model).__name__, "src_vocab_size": cfg.src_vocab_size,
                      "tgt_vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "num_heads": cfg.n_heads,
                      "d_ff": cfg.d_ff, "num_layers": cfg.n_layers,
                      "parameters": sum(p.numel() for p in model.parameters())},
        }
        sources = torch.Generator().manual_seed(seed)
        sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
        results: Dict[int, Dict[str, Any]] = {}
        bar = tqdm(total=len(lengths) * len(MODES), desc="kv cache demo", unit="run", disable=not progress)
        for L in lengths:
            src = torch.randint(FIRST_SYMBOL, cfg.src_vocab_size, (batch_size, L), generator=sources).to(device)
            row: Dict[str, Any] = {"new_tokens": L - 1}
            for mode in MODES:
                bar.set_postfix_str(f"max_length={L} {mode}")

                def run(use_cache=(mode == "cached")):
                    out = model.generate(src, max_length=L, use_cache=use_cache, temperature=0, eos_token_id=None)
                    sync()
                    return out

                samples = time_fn(run, warmup=warmup, repeats=num_runs).samples
                mean = statistics.fmean(samples)
                row[mode] = {"mean_s": mean, "std_s": statistics.stdev(samples) if len(samples) > 1 else 0.0,
                             "samples_s": samples, "ms_per_token": 1e3 * mean / (L - 1)}
                bar.update()
            row["speedup"] = row["uncached"]["mean_s"] / row["cached"]["mean_s"]
            results[L] = row
        bar.close()
        return {"settings": settings, "seq_lengths": lengths, "results": results}
    finally:
        torch.set_num_threads(previous_threads)  # leave the process as we found it (tests, notebooks)


def results_table(results: Dict[str, Any]) -> tuple:
    """``(rows, headers)`` of the markdown table :func:`main` prints."""
    headers = ["max_length", "new tokens", "cached (ms)", "uncached (ms)", "speedup", "cached ms/token",
               "uncached ms/token"]
    rows = []
    for L in results["seq_lengths"]:
        r = results["results"][L]
        c, u = r["cached"], r["uncached"]
        rows.append([L, r["new_tokens"], f"{1e3 * c['mean_s']:.1f} ± {1e3 * c['std_s']:.1f}",
                     f"{1e3 * u['mean_s']:.1f} ± {1e3 * u['std_s']:.1f}", f"{r['speedup']:.1f}x",
                     f"{c['ms_per_token']:.2f}", f"{u['ms_per_token']:.2f}"])
    return rows, headers


def plot_benchmark_results(results: Dict[str, Any], path: Union[str, Path] = "kv_cache_benchmark.png") -> Path:
    """Draw the results of :func:`benchmark_comparison` into a PNG and return its path.

    Left: mean generation time against ``max_length`` for both modes (error bars: one standard
    deviation).  Right: the speedup of the cache against ``max_length``.  Folders are created.
    Uses matplotlib's object API (no pyplot), so it never changes the caller's backend.
    """
    from matplotlib.figure import Figure

    lengths = results["seq_lengths"]
    rows = [results["results"][L] for L in lengths]
    fig = Figure(figsize=(10, 4), dpi=100)
    ax_time, ax_speed = fig.subplots(1, 2)
    for mode, marker in (("uncached", "o"), ("cached", "s")):
        ax_time.errorbar(lengths, [1e3 * r[mode]["mean_s"] for r in rows], yerr=[1e3 * r[mode]["std_s"] for r in rows],
                         marker=marker, capsize=3, label=f"use_cache={mode == 'cached'}")
    ax_time.set_xlabel("max_length (tokens, BOS included)")
    ax_time.set_ylabel("time to generate (ms)")
    ax_time.set_title("Greedy generation time")
    ax_time.set_ylim(bottom=0)
    ax_time.legend()
    ax_speed.plot(lengths, [r["speedup"] for r in rows], marker="o", color="tab:green")
    ax_speed.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax_speed.set_xlabel("max_length (tokens, BOS included)")
    ax_speed.set_ylabel("speedup (uncached / cached)")
    ax_speed.set_title("Speedup of the KV cache")
    ax_speed.set_ylim(bottom=0)
    for ax in (ax_time, ax_speed):
        ax.grid(alpha=0.3)
    s, m = results["settings"], results["settings"]["model"]
    fig.suptitle(f"{m['class']} d_model={m['d_model']}, {m['num_layers']}+{m['num_layers']} layers, "
                 f"batch {s['batch_size']}, {s['device']}, {s['threads']} thread(s), mean of {s['num_runs']} runs",
                 fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.kv_cache_demo",
        description="Time greedy generation of an encoder-decoder EnhancedTransformer with and without the KV "
                    "cache, print a markdown table and save a plot (PNG) plus the numbers (JSON + Markdown).")
    p.add_argument("--seq-lengths", type=int, nargs="+", default=[10, 20, 50, 100], metavar="L",
                   help="max_length values to time (source length too); default: 10 20 50 100")
    p.add_argument("--batch-size", type=int, default=2, help="sources decoded together (default 2)")
    p.add_argument("--num-runs", type=int, default=5, help="timed runs per length and mode (default 5; mean reported)")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"PNG to write; the numbers go next to it as .json and .md (default {DEFAULT_OUT})")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all available cores)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed for the weights and the sources (default 0)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p.parse_args(argv)


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    previous_threads = torch.get_num_threads()
    try:
        return _main(args, argv)
    finally:
        torch.set_num_threads(previous_threads)


def _main(args: argparse.Namespace, argv) -> Dict[str, Any]:
    threads = set_threads(args.threads)
    machine = machine_description()
    print(f"Machine: {format_machine(machine)}", flush=True)
    try:
        results = benchmark_comparison(args.seq_lengths, args.batch_size, args.num_runs, device=args.device,
                                       threads=threads, seed=args.seed, progress=not args.no_progress)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    rows, headers = results_table(results)
    m = results["settings"]["model"]
    title = (f"KV cache demo: {m['class']} (d_model={m['d_model']}, {m['num_layers']}+{m['num_layers']} layers, "
             f"{m['parameters']:,} parameters), batch {args.batch_size}, greedy, mean ± std of {args.num_runs} runs")
    text = print_table(rows, headers, title=title)
    png = plot_benchmark_results(results, args.out)
    command = "python -m benchmarks.kv_cache_demo " + " ".join(sys.argv[1:] if argv is None else argv)
    json_path = write_results(Path(args.out).with_suffix(".json"), results, machine=machine,
                              command=command.strip(), markdown=f"Machine: {format_machine(machine)}\n\n{text}")
    print(f"wrote {png}, {json_path} and {json_path.with_suffix('.md')}")
    return results


if __name__ == "__main__":
    main()
