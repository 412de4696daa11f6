"""Decode attention of a CPU serving step, three ways, side by side: what the paged kernel buys.

One decode step of ``--rows`` requests whose histories are uniform in ``[--min-len, --max-len]``
tokens (a serving step's mix), ``--heads`` heads of ``--head-dim``, over ``--layers`` layers
(the pool and the dense rows are far larger than the CPU's caches, as in the engine; a buffer is
also written between rounds so nothing stays cached).  Per layer:

* **rows + SDPA** (the engine's ``attention="rows"``): each request's keys also kept in a dense
  row; ``scaled_dot_product_attention`` over the rows in place, every row read to the longest
  history (keys past a row's own length masked);
* **gather + SDPA** (``attention="gather"``): each row's blocks copied out of the paged pool into
  a padded batch, then SDPA;
* **paged kernel** (``attention="paged"`` on a CPU, :mod:`transformer.cpu_attention`): each
  query reads exactly its own keys from the pool's blocks, in place.

Medians of interleaved rounds; the effective bandwidth counts the keys and values each way
*needs* (so padding read by SDPA shows as lower bandwidth).

    python -m benchmarks.cpu_attention_benchmark            # 128 rows, 8 heads of 32, lengths in [16, 256]
    python -m benchmarks.cpu_attention_benchmark --quick    # smoke test (numbers mean nothing)
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from benchmarks.common import format_machine, machine_description, markdown_table, set_threads, write_results
from transformer import cpu_attention

DEFAULT_OUT = "benchmarks/results/cpu_attention.json"


def interleaved_ms(fns: Dict[str, Callable[[int], object]], rounds: int, layers: int,
                   evict: torch.Tensor) -> Dict[str, float]:
    """Median milliseconds per layer of each way, timed in turns over all layers, the caches
    flushed (``evict`` written) before each."""
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for r in range(rounds + 1):
        for name, fn in fns.items():
            evict.add_(1.0)
            t0 = time.perf_counter()
            for layer in range(layers):
                fn(layer)
            if r:  # the first round warms up (allocations, the kernel's first load)
                times[name].append((time.perf_counter() - t0) / layers * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=128, help="requests in the decode step [128]")
    p.add_argument("--heads", type=int, default=8, help="attention heads (= key/value heads) [8]")
    p.add_argument("--head-dim", type=int, default=32, help="head size [32]")
    p.add_argument("--min-len", type=int, default=16, help="shortest history [16]")
    p.add_argument("--max-len", type=int, default=256, help="longest history (the row length) [256]")
    p.add_argument("--block-size", type=int, default=16, help="pool block size [16]")
    p.add_argument("--layers", type=int, default=4, help="layers (separate pools and rows) [4]")
    p.add_argument("--rounds", type=int, default=11, help="interleaved rounds (median reported) [11]")
    p.add_argument("--threads", type=int, default=None, help="torch threads [all cores]")
    p.add_argument("--quick", action="store_true", help="8 rows of at most 32 tokens, 2 layers, 3 rounds: a smoke test")
    p.add_argument("--out", default=None, help=f"JSON to write [{DEFAULT_OUT}; --quick: none]")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.max_len, args.min_len, args.layers, args.rounds = 8, 32, 4, 2, 3
    for name in ("rows", "heads", "head_dim", "min_len", "max_len", "block_size", "layers", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.min_len > args.max_len:
        p.error(f"--min-len {args.min_len} must be <= --max-len {args.max_len}")
    if not cpu_attention.available("cpu", torch.float32):
        p.error(f"the CPU paged-attention kernel cannot be built here: {cpu_attention.why_not()}")
    set_threads(args.threads)
    R, H, D, L, bs, NL = args.rows, args.heads, args.head_dim, args.max_len, args.block_size, args.layers
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(args.min_len, L + 1, (R,), generator=g)
    lens[0] = L  # the step's longest row: what SDPA over the rows pads to
    W = -(-L // bs)
    nblocks = R * W
    table = torch.randperm(nblocks, generator=g).view(R, W)  # blocks scattered over the pool, as served
    pool = torch.randn(2, NL, nblocks * bs, H, D, generator=g)  # the paged pool: (slots, H, D) per layer
    rows = torch.randn(2, NL, R, H, L, D, generator=g)  # the dense rows of attention="rows"
    q = torch.randn(R, 1, H, D, generator=g)
    qpos = (lens - 1).view(R, 1)
    bias = torch.zeros(R, 1, 1, L).masked_fill_(torch.arange(L) >= lens.view(R, 1, 1, 1), float("-inf"))
    slots = (table.unsqueeze(-1) * bs + torch.arange(bs)).flatten(1)[:, :L].flatten()  # (R * L,)
    evict = torch.empty(16 * 2 ** 20)  # 64 MiB written between timings: larger than this VM's L3
    qt = q.transpose(1, 2)  # (R, H, 1, D)

    def rows_sdpa(layer):
        return F.scaled_dot_product_attention(qt, rows[0, layer], rows[1, layer], attn_mask=bias)

    scratch = torch.empty(2, R * L, H * D)  # reused, as BlockPool.read's out= (no page faults per call)

    def gather_sdpa(layer):  # rows of H * D elements, as BlockPool.read gathers them
        k = torch.index_select(pool[0, layer].view(-1, H * D), 0, slots, out=scratch[0]).view(R, L, H, D).transpose(1, 2)
        v = torch.index_select(pool[1, layer].view(-1, H * D), 0, slots, out=scratch[1]).view(R, L, H, D).transpose(1, 2)
        return F.scaled_dot_product_attention(qt, k, v, attn_mask=bias)

    def paged(layer):
        return cpu_attention.paged_attention(q, pool[0, layer], pool[1, layer], table, bs, qpos)

    for r in range(R):  # layer 0's rows hold the pool's keys: the three ways must agree there
        rows[:, 0, r].copy_(pool[:, 0].index_select(1, slots.view(R, L)[r]).transpose(1, 2))
    want = rows_sdpa(0)
    for name, got in (("gather + SDPA", gather_sdpa(0)), ("paged kernel", paged(0).transpose(1, 2))):
        err = (got - want).abs().max().item()
        if err > 1e-4:
            raise AssertionError(f"{name} differs from rows + SDPA by {err:.2e}")
    ms = interleaved_ms({"rows + SDPA": rows_sdpa, "gather + SDPA": gather_sdpa, "paged kernel": paged},
                        args.rounds, NL, evict)
    needed = 2 * int(lens.sum()) * H * D * 4  # bytes of keys and values the step needs
    result = [dict(way=name, ms=t, gb_s=needed / t / 1e6, vs_rows=ms["rows + SDPA"] / t) for name, t in ms.items()]
    machine = machine_description()
    table_md = markdown_table([[r["way"], f"{r['ms']:.2f}", f"{r['gb_s']:.1f}", f"{r['vs_rows']:.2f}x"] for r in result],
                              ["decode attention, one layer", "ms", "GB/s of needed keys", "vs rows + SDPA"])
    text = (f"## CPU decode attention, {R} rows x {H} heads x {D}, histories uniform in "
            f"[{args.min_len}, {L}]\n\nMachine: {format_machine(machine)}.  Medians of {args.rounds} interleaved "
            f"rounds over {NL} layers, caches flushed before each.  The step needs {needed / 1e6:.1f} MB of keys and "
            f"values; SDPA over rows reads every row to {L} tokens ({R * L / int(lens.sum()):.2f}x that).\n\n"
            f"{table_md}\n")
    print(text)
    out = args.out or (None if args.quick else DEFAULT_OUT)
    if out:
        write_results(out, dict(rows=result, args=vars(args)), machine, markdown=text)
    return dict(rows=result)


if __name__ == "__main__":
    main()
