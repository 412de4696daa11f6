"""The serving engine's sampling pass on a CPU: what its two shortcuts save, side by side.

One engine step samples ``--rows`` requests over a ``--vocab`` vocabulary.  Two parts of it are
timed, each against the way it was done before, in interleaved rounds (medians):

* **noise**: one ``torch.Generator`` per request drawing its row of ``Exp(1)`` noise (one call
  per row), against :func:`transformer.fast_decode.request_noise` (a hash of each request's seed
  and position, one pass for the whole step); and that hash computed as it first was (int64, a
  new tensor per operation) against how it is now (int32, in place), the same bits;
* **filters**: :func:`transformer.sampling.process_logits_rows` with a full sort of every row,
  against ``width=`` (each row's best candidates first; the rows they do not decide sorted
  whole), for top-k, top-k + top-p and top-p over peaked and over flat logits.

    python -m benchmarks.sampling_benchmark                 # 64 rows x 4,096 (the default model)
    python -m benchmarks.sampling_benchmark --quick         # smoke test (numbers mean nothing)
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import torch

from benchmarks.common import format_machine, machine_description, markdown_table, set_threads, write_results
from transformer.fast_decode import _M32, _ROW_STRIDE, _mix32, _unit, request_noise
from transformer.sampling import process_logits_rows

DEFAULT_OUT = "benchmarks/results/sampling_cpu.json"
#: (name, logit scale, top_k, top_p): flat logits (scale 1, random weights) keep most of the
#: vocabulary under top-p; peaked ones (scale 4, closer to a trained model) keep a few dozen.
FILTERS = [("top-k 50", 1.0, 50, None), ("top-k 50 + top-p 0.9", 1.0, 50, 0.9),
           ("top-p 0.95, peaked logits", 4.0, None, 0.95), ("top-p 0.95, flat logits", 1.0, None, 0.95)]


def int64_request_noise(seeds: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    """``request_noise`` as it was first written: the same hash on int64 words masked to 32 bits,
    each operation a new ``S x vocab`` tensor (the same bits as today's int32, in-place one)."""
    key = _mix32((_mix32((seeds ^ _mix32(counters & _M32)) & _M32) + _ROW_STRIDE) & _M32)
    return _unit(_mix32(key[:, None] ^ torch.arange(vocab)))


def interleaved_ms(fns: Dict[str, Callable[[], object]], rounds: int, calls: int) -> Dict[str, float]:
    """Median milliseconds per call of each function, timed in turns (``rounds`` x ``calls``)."""
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - t0) / calls * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=64, help="sampled requests in the step [64]")
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary size [4096]")
    p.add_argument("--width", type=int, default=64, help="candidates per row for top-p (the engine's CPU width) [64]")
    p.add_argument("--rounds", type=int, default=11, help="interleaved rounds (median reported) [11]")
    p.add_argument("--threads", type=int, default=None, help="torch threads [all cores]")
    p.add_argument("--quick", action="store_true", help="8 rows x 256, 3 rounds: a smoke test")
    p.add_argument("--out", default=None, help=f"JSON to write [{DEFAULT_OUT}; --quick: none]")
    args = p.parse_args(argv)
    for name in ("rows", "vocab", "width", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.quick:
        args.rows, args.vocab, args.rounds = 8, 256, 3
    set_threads(args.threads)
    B, V, calls = args.rows, args.vocab, 3 if args.quick else 10
    g = torch.Generator().manual_seed(0)
    gens = [torch.Generator().manual_seed(i) for i in range(B)]

    def per_row_generators():
        noise = torch.empty(B, V)
        for i in range(B):
            noise[i].exponential_(generator=gens[i])
        return noise

    seeds, positions = torch.arange(B), torch.full((B,), 7)
    rows = []
    noise = interleaved_ms({"before": per_row_generators,
                            "after": lambda: request_noise(seeds, positions, V).log_().neg_()}, args.rounds, calls)
    rows.append(dict(part="noise, temperature only", before="a Generator per row", after="request_noise",
                     before_ms=noise["before"], after_ms=noise["after"]))
    assert torch.equal(int64_request_noise(seeds, positions, V), request_noise(seeds, positions, V))
    noise = interleaved_ms({"before": lambda: int64_request_noise(seeds, positions, V),
                            "after": lambda: request_noise(seeds, positions, V)}, args.rounds, calls)
    rows.append(dict(part="the hash of request_noise", before="int64, a tensor per op", after="int32, in place",
                     before_ms=noise["before"], after_ms=noise["after"]))
    temperature = torch.full((B,), 0.8)
    for name, scale, k, top_p in FILTERS:
        logits = torch.randn(B, V, generator=g) * scale
        top_k = None if k is None else torch.full((B,), min(k, V))
        tp = None if top_p is None else torch.full((B,), top_p)
        width = min(k, V) if k is not None else args.width
        ms = interleaved_ms({"before": lambda: process_logits_rows(logits, temperature, top_k, tp),
                             "after": lambda: process_logits_rows(logits, temperature, top_k, tp, width)},
                            args.rounds, calls)
        rows.append(dict(part=f"filters: {name}", before="full sort", after=f"width {width}",
                         before_ms=ms["before"], after_ms=ms["after"]))
    for r in rows:
        r["speedup"] = r["before_ms"] / r["after_ms"]
    machine = machine_description()
    table = markdown_table([[r["part"], r["before"], f"{r['before_ms']:.2f}", r["after"], f"{r['after_ms']:.2f}",
                             f"{r['speedup']:.2f}x"] for r in rows],
                           ["part of the sampling pass", "before", "ms", "after", "ms", "speedup"])
    text = (f"## Sampling pass, {B} rows x {V:,} vocabulary, CPU\n\nMachine: {format_machine(machine)}.  "
            f"Medians of {args.rounds} interleaved rounds of {calls} calls.\n\n{table}\n")
    print(text)
    out = args.out or (None if args.quick else DEFAULT_OUT)
    if out:
        write_results(out, dict(rows=rows, args=vars(args)), machine, markdown=text)
    return dict(rows=rows)


if __name__ == "__main__":
    main()
