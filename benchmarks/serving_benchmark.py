"""Serving many requests: continuous batching against static batching and one request at a time.

The workload is nano-vllm's benchmark shape: ``N`` requests whose prompt and output lengths are
drawn uniformly from a range, all arriving at once, no early stop (every request generates its
full ``max_tokens``).  Three ways to serve it, timed in one run on the same weights:

* **continuous** -- :class:`transformer.engine.LLMEngine`: requests join and leave the running
  batch every step, prompts are prefilled in chunks under a token budget, memory is the paged pool;
* **static** -- ``generate()`` over batches of ``--batch`` requests in arrival order, each batch
  left-padded to its longest prompt and decoded until its longest output is done (what a server
  without continuous batching does);
* **one at a time** -- ``generate()`` per request, in order.

With ``--repeat N`` every mode runs ``N`` times, the modes taking turns, and each mode's median
run is reported (a shared machine's speed drifts; interleaving spreads a slow spell over every
mode).  Reported per mode: output tokens/s (requested output tokens / wall time), time to first token
(TTFT) and inter-token latency (ITL), p50 and p99 over requests.  Every mode's greedy tokens are
compared with one-at-a-time ``generate()``.

    python -m benchmarks.serving_benchmark --checkpoint out          # the default trained model
    python -m benchmarks.serving_benchmark --random                  # its shape, random weights
    python -m benchmarks.serving_benchmark --random --quick          # smoke test (seconds)
    python -m benchmarks.serving_benchmark --random --requests 256 --max-num-seqs 256 \
        --max-num-batched-tokens 2048 --num-blocks 4096 --attention paged rows --batch 64 256 \
        --no-one-at-a-time --repeat 5                                 # the README's CPU row
    python -m benchmarks.serving_benchmark --gpt2-shape --device cuda --dtype bfloat16 \
        --requests 256 --min-len 100 --max-len 1024 --batch 64 --static-compile --no-one-at-a-time

With ``--transformers`` (and ``--gpt2-shape``), ``transformers``' own continuous batching runs the
same workload on the same weights (:mod:`benchmarks.hf_continuous_batching`).  See ``docs/serving.md``.
"""

from __future__ import annotations

import argparse
import time
from typing import Dict, List

import torch

from benchmarks.common import format_machine, machine_description, markdown_table, set_threads, write_results
from transformer import DecoderOnlyTransformer, ModelConfig
from benchmarks.hf_continuous_batching import build_gpt2_pair, run_transformers_cb
from transformer.engine import LLMEngine, SamplingParams

DEFAULT_OUT = "benchmarks/results/serving_cpu.json"


def workload(n: int, lo: int, hi: int, vocab: int, seed: int):
    """``n`` (prompt ids, output length) pairs, lengths uniform in ``[lo, hi]``."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n, 2), generator=g).tolist()
    return [(torch.randint(0, vocab, (p,), generator=g).tolist(), o) for p, o in lens]


def pct(xs: List[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def summarize(name: str, wall: float, out_tokens: int, ttft: List[float], itl: List[float]) -> Dict:
    return dict(mode=name, wall_s=wall, output_tokens=out_tokens, tokens_per_s=out_tokens / wall,
                ttft_p50_ms=1e3 * pct(ttft, 0.5), ttft_p99_ms=1e3 * pct(ttft, 0.99),
                itl_p50_ms=1e3 * pct(itl, 0.5), itl_p99_ms=1e3 * pct(itl, 0.99))


def make_engine(model, args, reqs, attention: str = "auto") -> LLMEngine:
    """The engine of ``args`` (decode ``attention`` as ``LLMEngine`` takes it), warmed up as a
    server does before it takes requests (attention kernels compiled, CUDA graphs recorded)."""
    engine = LLMEngine(model, num_blocks=args.num_blocks, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens, attention=attention,
                       cuda_graph=False if args.no_cuda_graph else None,
                       async_scheduling=False if args.no_async else None)
    t_warm = time.perf_counter()
    if engine.runner.cuda_graph:
        engine.runner.capture_all()
    engine.generate([reqs[0][0][:8]], SamplingParams(max_tokens=2, ignore_eos=True))
    engine.warm_up_s = time.perf_counter() - t_warm
    return engine


def run_invariance(model, reqs, args) -> List[Dict]:
    """Does a request's output depend on its batch?  The first ``args.invariance`` requests of
    the workload, run with all the others and then each alone through the same engine, greedy
    and seeded-sampled (temperature 1, seed = request index).  Batched float arithmetic (matrix
    products of another shape, padded attention) can flip a near-tie; this counts how often."""
    engine, n, rows = make_engine(model, args, reqs, args.attention[0]), args.invariance, []
    for name, temperature in (("greedy", 0.0), ("sampled, temperature 1, seeded", 1.0)):
        params = [SamplingParams(max_tokens=o, ignore_eos=True, temperature=temperature, seed=i)
                  for i, (_, o) in enumerate(reqs)]
        batched = engine.generate([p for p, _ in reqs], params)
        same, first_diff = 0, []
        for i in range(n):
            solo = engine.generate([reqs[i][0]], [params[i]])[0]
            same += solo == batched[i]
            if solo != batched[i]:
                first_diff.append(next(j for j, (a, b) in enumerate(zip(solo, batched[i])) if a != b))
        rows.append(dict(decoding=name, requests=n, identical=same / n, tokens=sum(o for _, o in reqs[:n]),
                         first_difference_at=sorted(first_diff)))
        print(f"invariance ({name}): {same}/{n} requests identical alone and in the batch", flush=True)
    return rows


def run_continuous(model, reqs, args, attention: str = "auto"):
    engine = make_engine(model, args, reqs, attention)
    warm = engine.warm_up_s
    profiler = None
    if args.profile:
        import cProfile
        profiler = cProfile.Profile()
        profiler.enable()
    t0 = time.perf_counter()
    rids = [engine.add_request(p, SamplingParams(max_tokens=o, ignore_eos=True, temperature=args.temperature, seed=i))
            for i, (p, o) in enumerate(reqs)]
    times: Dict[str, List[float]] = {r: [] for r in rids}
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            if o.new_token_ids:
                times[o.request_id].append(now)
    wall = time.perf_counter() - t0
    if profiler is not None:
        import pstats
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    tokens = [engine.pop_finished(r).output_ids for r in rids]
    ttft = [ts[0] - t0 for ts in times.values()]
    itl = [b - a for ts in times.values() for a, b in zip(ts, ts[1:])]
    runner = engine.runner
    name = (f"continuous (LLMEngine, {runner.attention}{', CUDA graphs' if runner.cuda_graph else ''}"
            f"{', async' if engine.async_scheduling else ''})")
    row = summarize(name, wall, sum(o for _, o in reqs), ttft, itl)
    row["preemptions"], row["warm_up_s"], row["steps"] = engine.scheduler.num_preemptions, warm, engine.num_steps
    return row, tokens


def _sampling(temperature: float) -> Dict:
    """``generate()``'s keywords for ``--temperature``: greedy at 0, else sampling at it."""
    return dict(do_sample=True, temperature=temperature) if temperature > 0 else {}


def run_static(model, reqs, batch: int, compile: bool = False, temperature: float = 0.0):
    """``generate()`` over batches of ``batch`` requests in arrival order, each left-padded to its
    longest prompt.  With ``compile``, every batch's call is made once untimed first: each batch
    and length bucket compiles its own step, and timing that would be timing the compiler (the
    engine is warmed up likewise, :func:`make_engine`).  The clock starts after a device sync:
    the compiled path returns without waiting for its GPU work (no stop token, no streamer), and
    the warm-up's queued work, timed, once cost this row 20%."""
    dev = next(model.parameters()).device
    groups = []
    for s in range(0, len(reqs), batch):
        group = reqs[s:s + batch]
        P = max(len(p) for p, _ in group)
        ids = torch.zeros(len(group), P, dtype=torch.long)
        mask = torch.zeros(len(group), P, dtype=torch.long)
        for i, (p, _) in enumerate(group):
            ids[i, P - len(p):], mask[i, P - len(p):] = torch.tensor(p), 1
        groups.append((group, P, ids.to(dev), mask.to(dev)))
    if compile:
        for group, _, ids, mask in groups:
            model.generate(ids, max(o for _, o in group), attention_mask=mask, eos_token_id=None, compile=True,
                           **_sampling(temperature))
    if dev.type == "cuda":  # the compiled path returns before its GPU work is done: let it finish untimed
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    ttft, itl, tokens = [], [], []
    for group, P, ids, mask in groups:
        stamps = []
        out = model.generate(ids, max(o for _, o in group), attention_mask=mask, eos_token_id=None,
                             compile=compile, streamer=lambda _tok: stamps.append(time.perf_counter()),
                             **_sampling(temperature))
        for i, (_, o) in enumerate(group):
            ttft.append(stamps[0] - t0)
            itl += [b - a for a, b in zip(stamps[:o - 1], stamps[1:o])]
            tokens.append(out[i, P:P + o].tolist())
    wall = time.perf_counter() - t0
    return summarize(f"static batches of {batch} (generate{', compile=True' if compile else ''})", wall, sum(o for _, o in reqs), ttft, itl), tokens


def run_one_at_a_time(model, reqs, temperature: float = 0.0):
    t0 = time.perf_counter()
    ttft, itl, tokens = [], [], []
    for p, o in reqs:
        stamps = []
        out = model.generate(torch.tensor([p], device=next(model.parameters()).device), o, eos_token_id=None,
                             **_sampling(temperature),
                             streamer=lambda _tok: stamps.append(time.perf_counter()))
        ttft.append(stamps[0] - t0)
        itl += [b - a for a, b in zip(stamps, stamps[1:])]
        tokens.append(out[0, len(p):].tolist())
    wall = time.perf_counter() - t0
    return summarize("one at a time (generate)", wall, sum(o for _, o in reqs), ttft, itl), tokens


def _spread(row: Dict) -> str:
    """``"mode min-max"`` of a row's throughputs over its repeated runs."""
    xs = row["tokens_per_s_runs"]
    return f"{row['mode']} {min(xs):.0f}-{max(xs):.0f}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a train.py run directory or checkpoint")
    src.add_argument("--random", action="store_true", help="the default model's shape with random weights")
    src.add_argument("--gpt2-shape", action="store_true", help="GPT-2-124M's shape (12 x 768, 50,257 vocab), random")
    p.add_argument("--device", default="cpu", help="cpu or cuda [cpu]")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="model dtype [float32]")
    p.add_argument("--static-compile", action="store_true", help="static batches with generate(compile=True)")
    p.add_argument("--requests", type=int, default=64, help="number of requests [64]")
    p.add_argument("--min-len", type=int, default=16, help="shortest prompt and output [16]")
    p.add_argument("--max-len", type=int, default=128, help="longest prompt and output [128]")
    p.add_argument("--batch", type=int, nargs="+", default=None,
                   help="static batch size(s), one static row each [the engine's --max-num-seqs]")
    p.add_argument("--num-blocks", type=int, default=1024, help="engine KV blocks [1024]")
    p.add_argument("--block-size", type=int, default=16, help="engine block size [16]")
    p.add_argument("--max-num-seqs", type=int, default=64, help="engine: most requests per step [64]")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="engine: most tokens per step [512]")
    p.add_argument("--attention", choices=("auto", "paged", "rows", "gather"), nargs="+", default=["auto"],
                   help="engine attention, one continuous row each [auto: paged (on a CPU: the C kernel, or rows without a compiler)]")
    p.add_argument("--no-cuda-graph", action="store_true", help="engine: no CUDA graphs for decode steps")
    p.add_argument("--no-async", action="store_true", help="engine: read each step's tokens before the next "
                   "(no overlap of host and GPU work)")
    p.add_argument("--invariance", type=int, default=0, metavar="N",
                   help="also run the first N requests alone and count how many get the same tokens as in "
                        "the batch, greedy and seeded-sampled [0: skip]")
    p.add_argument("--transformers", action="store_true",
                   help="also time transformers' continuous batching on the same weights (needs --gpt2-shape)")
    p.add_argument("--profile", action="store_true", help="print a cProfile of the engine's loop (host time)")
    p.add_argument("--no-static", action="store_true", help="skip static batching (then ratios are to the engine)")
    p.add_argument("--threads", type=int, default=None, help="torch threads [all cores]")
    p.add_argument("--no-one-at-a-time", action="store_true", help="skip the slowest mode")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sample every request at this temperature (request i seeded with i); 0 = greedy, "
                        "the only setting where tokens are compared across modes [0]")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run every mode N times, taking turns, and report each mode's median run: on a shared "
                        "machine whose speed drifts, a ratio of medians of interleaved runs holds still [1]")
    p.add_argument("--quick", action="store_true", help="8 short requests: a smoke test (numbers mean nothing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help=f"JSON to write [{DEFAULT_OUT}; --quick: none]")
    args = p.parse_args(argv)
    if not args.temperature >= 0:
        p.error(f"--temperature must be >= 0, got {args.temperature}")
    if args.repeat < 1:
        p.error(f"--repeat must be at least 1, got {args.repeat}")
    if args.transformers and not args.gpt2_shape:
        p.error("--transformers needs --gpt2-shape (a model both libraries load with the same weights)")
    if args.quick:
        args.requests, args.min_len, args.max_len, args.batch = 8, 4, 12, [4]
    args.batch = args.batch or [args.max_num_seqs]
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.random:
        model = DecoderOnlyTransformer(ModelConfig(vocab_size=4096, d_model=256, n_layers=4, n_heads=4, max_seq_len=256,
                                                   pos_encoding="rope", norm="rmsnorm", bias=False)).eval()
        if args.quick:
            model = DecoderOnlyTransformer(ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4,
                                                       max_seq_len=64)).eval()
    elif args.gpt2_shape:  # built with transformers and loaded here: both libraries hold the same weights
        shape = (dict(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=64, initializer_range=0.3)
                 if args.quick else dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=2048))
        model, hf_model = build_gpt2_pair(shape, args.device, getattr(torch, args.dtype), seed=args.seed)
    else:
        from transformer.checkpoint import load_model
        model = load_model(args.checkpoint)[0]
    model.to(device=args.device, dtype=getattr(torch, args.dtype))
    reqs = workload(args.requests, args.min_len, args.max_len, model.config.vocab_size, args.seed)
    rows, outputs, runs = [], {}, {}
    with torch.inference_mode():
        model.generate(torch.tensor([reqs[0][0]], device=args.device), 4, eos_token_id=None)  # warm-up
        static = [(f"static{b}", None if args.no_static else
                   lambda b=b: run_static(model, reqs, b, args.static_compile, args.temperature)) for b in args.batch]
        continuous = [(f"continuous-{a}", lambda a=a: run_continuous(model, reqs, args, a)) for a in args.attention]
        modes = [(name, fn) for name, fn in (
            *continuous, *static,
            ("transformers", None if not args.transformers else lambda: run_transformers_cb(
                hf_model, reqs, num_blocks=args.num_blocks, block_size=args.block_size,
                max_batch_tokens=args.max_num_batched_tokens, max_requests_per_batch=args.max_num_seqs)),
            ("one", None if args.no_one_at_a_time else lambda: run_one_at_a_time(model, reqs, args.temperature)))
            if fn is not None]
        for _ in range(args.repeat):  # round-robin: a slow spell of the machine hits every mode alike
            for name, fn in modes:
                row, toks = fn()
                runs.setdefault(name, []).append((row, toks))
                print(f"{row['mode']}: {row['tokens_per_s']:.1f} output tokens/s", flush=True)
    for name, _ in modes:
        done = sorted(runs[name], key=lambda run: run[0]["tokens_per_s"])
        row, toks = done[(len(done) - 1) // 2]  # the median run (the lower middle one of an even count)
        row["tokens_per_s_runs"] = [run[0]["tokens_per_s"] for run in done]
        rows.append(row)
        outputs[name] = toks
    ref = outputs.get("one") if args.temperature == 0 else None  # sampled: each path has its own noise
    for row, name in zip(rows, outputs):
        row["same_tokens_as_one_at_a_time"] = None if ref is None else sum(
            a == b for a, b in zip(outputs[name], ref)) / len(ref)
    # the best static row is the baseline (static batching at its best batch size)
    base = max((r["tokens_per_s"] for r in rows if r["mode"].startswith("static")), default=rows[0]["tokens_per_s"])
    table = markdown_table(
        [[r["mode"], f"{r['tokens_per_s']:.1f}", f"{r['tokens_per_s'] / base:.2f}", f"{r['ttft_p50_ms']:.0f}",
          f"{r['ttft_p99_ms']:.0f}", f"{r['itl_p50_ms']:.1f}", f"{r['itl_p99_ms']:.1f}",
          "-" if r["same_tokens_as_one_at_a_time"] is None else f"{100 * r['same_tokens_as_one_at_a_time']:.0f}%"]
         for r in rows],
        ["mode", "output tokens/s", "vs static", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms",
         "requests with the same tokens as one at a time"])
    machine = machine_description()
    cfg = model.config
    gpu = f" GPU: {torch.cuda.get_device_name()}." if args.device.startswith("cuda") else ""
    text = (f"## Serving benchmark\n\nMachine: {format_machine(machine)}.{gpu}\n\nModel: {cfg.n_layers} layers, d_model "
            f"{cfg.d_model}, vocab {cfg.vocab_size}, context {cfg.max_seq_len}, "
            f"{args.checkpoint or 'random weights'}, {args.dtype} on {args.device}.  Workload: {args.requests} requests, "
            f"prompt and output lengths uniform in [{args.min_len}, {args.max_len}], all at t=0, no early stop, "
            f"{'greedy' if args.temperature == 0 else f'sampled at temperature {args.temperature:g}'}.  "
            f"Engine: {args.num_blocks} blocks of {args.block_size}, max_num_seqs {args.max_num_seqs}, "
            f"max_num_batched_tokens {args.max_num_batched_tokens}.  \"vs static\": against the best static row."
            + (f"  Each mode ran {args.repeat} times, taking turns; its median run is shown, with the range of "
               f"its tokens/s: {'; '.join(_spread(r) for r in rows)}." if args.repeat > 1 else "")
            + f"\n\n{table}\n")
    invariance = run_invariance(model, reqs, args) if args.invariance else []
    if invariance:
        text += "\nBatch invariance: the first requests run alone through the same engine, against the batch above.\n\n"
        text += markdown_table([[r["decoding"], str(r["requests"]), f"{100 * r['identical']:.0f}%",
                                 ", ".join(map(str, r["first_difference_at"])) or "-"] for r in invariance],
                               ["decoding", "requests", "identical alone and in the batch",
                                "first differing token of the others"]) + "\n"
    print("\n" + text)
    out = args.out or (None if args.quick else DEFAULT_OUT)
    if out:
        write_results(out, dict(rows=rows, invariance=invariance, args=vars(args)), machine, markdown=text)


if __name__ == "__main__":
    main()
