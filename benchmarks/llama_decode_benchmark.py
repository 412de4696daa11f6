"""Decode speed of a Llama-3.2-1B-shape model: this project's compiled fast path beside gpt-fast.

Run from the repository root (an NVIDIA GPU; ``--quick`` runs a tiny shape on any device)::

    python -m benchmarks.llama_decode_benchmark --device cuda --gpt-fast PATH/TO/gpt-fast
    python -m benchmarks.llama_decode_benchmark --quick --device cpu       # smoke test, numbers mean nothing

The model: 16 layers, 2048 wide, 32 query heads and 8 key/value heads of 64, a gated SiLU MLP of
8192, RMSNorm, RoPE (theta 500,000, Llama 3's scaling), vocabulary 128,256, tied embeddings:
Llama-3.2-1B's shape with random weights, bfloat16.  ``--gpt-fast`` points at a checkout of
https://github.com/pytorch-labs/gpt-fast; its ``model.Transformer`` is built with the same shape
and its own decode loop (``generate.generate`` with ``decode_one_token`` compiled
``mode="reduce-overhead", fullgraph=True``, as its ``main`` does) is timed.

Each system runs in a subprocess of its own (gpt-fast sets global ``torch._inductor`` options on
import; a separate process keeps them from changing this project's rows).  Both sample the same
way (temperature 0.8, top-k 200: gpt-fast's defaults) after a 16-token prompt, and both count
``new_tokens / wall time of the whole call`` (prefill included, as gpt-fast reports), the median
of ``--repeats`` calls after warm-up calls that compile.

Bandwidth: a decode step must read every weight once (the tied embedding counted once, as the
output matrix) plus the keys and values of every row.  ``% of copy`` is ``bytes per step x
steps/s / copy bandwidth`` where the copy bandwidth is measured in the same run (a large
``dst.copy_(src)``, bytes read plus bytes written): the fraction of what the memory system
delivers that decoding uses.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types
from typing import Any, Dict, List

import torch

from .common import format_machine, machine_description, markdown_table, write_results
from .fast_decode_benchmark import copy_bandwidth, sync

#: Llama-3.2-1B (config.json of meta-llama/Llama-3.2-1B).
LLAMA_1B = dict(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, d_ff=8192,
                rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                norm_eps=1e-5, tie_embeddings=True)
QUICK = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128,
             rope_theta=500000.0, rope_scaling=None, norm_eps=1e-5, tie_embeddings=True)
SAMPLING = dict(temperature=0.8, top_k=200)


def model_config(shape: Dict[str, Any], max_seq_len: int):
    """This project's :class:`ModelConfig` of ``shape`` (a Llama block: RMSNorm, RoPE, SwiGLU, no biases)."""
    from transformer import ModelConfig
    return ModelConfig(max_seq_len=max_seq_len, pos_encoding="rope", norm="rmsnorm", bias=False, mlp="gated",
                       activation="silu", dropout=0.0, **shape)


def step_bytes(shape: Dict[str, Any], batch: int, context: float, elem: int = 2) -> float:
    """Bytes one decode step reads: each weight once plus ``batch`` rows of keys/values at ``context``."""
    d, ff, L = shape["d_model"], shape["d_ff"], shape["n_layers"]
    q, kv = shape["n_heads"] * shape["head_dim"], shape["n_kv_heads"] * shape["head_dim"]
    per_layer = d * (q + 2 * kv) + q * d + 3 * d * ff + 2 * d
    params = L * per_layer + shape["vocab_size"] * d + d  # output matrix (tied: read once) + final norm
    cache = 2 * L * kv * context * batch
    return (params + cache) * elem


def _timed(call, repeats: int, warmup: int, device) -> List[float]:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        call()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def run_ours(args, batch: int) -> Dict[str, Any]:
    """This project's ``FastDecoder`` (``compile=True``; CUDA graphs on a GPU) on the shape; system
    ``ours-tuned`` compiles with inductor's coordinate-descent tuning (gpt-fast's setting),
    ``ours-autotune`` with its max-autotune, ``ours-combo`` with its combo kernels (independent
    small kernels launched as one)."""
    from transformer import DecoderOnlyTransformer, FastDecoder
    device = torch.device(args.device)
    shape = QUICK if args.quick else LLAMA_1B
    torch.manual_seed(0)
    with torch.device(device):
        model = DecoderOnlyTransformer(model_config(shape, args.prompt_len + args.new_tokens + 8))
    model = model.to(torch.bfloat16).eval()
    options = {"ours-tuned": {"coordinate_descent_tuning": True}, "ours-autotune": {"max_autotune": True},
               "ours-combo": {"combo_kernels": True}}.get(args.system)
    fast = FastDecoder(model, batch_size=batch, max_cache_len=args.prompt_len + args.new_tokens + 1,
                       compile=not args.no_compile, compile_options=options)
    prompt = torch.randint(0, shape["vocab_size"], (batch, args.prompt_len), device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    call = lambda: fast.generate(prompt, args.new_tokens, do_sample=True, generator=gen, **SAMPLING)  # noqa: E731
    return dict(times=_timed(call, args.repeats, args.warmup, device))


def run_gpt_fast(args, batch: int) -> Dict[str, Any]:
    """gpt-fast's ``Transformer`` and decode loop (from the checkout ``args.gpt_fast``) on the shape."""
    sys.path.insert(0, os.path.abspath(args.gpt_fast))
    sys.modules.setdefault("tokenizer", types.ModuleType("tokenizer"))  # theirs imports sentencepiece/tiktoken
    sys.modules["tokenizer"].get_tokenizer = None
    if not hasattr(torch.backends.cuda, "sdp_kernel"):  # removed in newer torch; theirs uses it (math kernel)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        torch.backends.cuda.sdp_kernel = lambda **kw: sdpa_kernel(SDPBackend.MATH)
    import generate as gf  # noqa: E402  (gpt-fast's generate.py: sets its inductor options)
    from model import ModelArgs, Transformer  # noqa: E402
    device = torch.device(args.device)
    s = QUICK if args.quick else LLAMA_1B
    scaling = None if s["rope_scaling"] is None else {k: v for k, v in s["rope_scaling"].items() if k != "rope_type"}
    margs = ModelArgs(block_size=2048, vocab_size=s["vocab_size"], n_layer=s["n_layers"], n_head=s["n_heads"],
                      dim=s["d_model"], intermediate_size=s["d_ff"], n_local_heads=s["n_kv_heads"],
                      rope_base=s["rope_theta"], norm_eps=s["norm_eps"], rope_scaling=scaling)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(margs)
    model = model.to(torch.bfloat16).eval()
    if not args.no_compile:  # what gpt-fast's main() does with --compile
        gf.decode_one_token = torch.compile(gf.decode_one_token, mode="reduce-overhead", fullgraph=True)
    prompt = torch.randint(0, s["vocab_size"], (args.prompt_len,), device=device, dtype=torch.int)

    def call():
        with torch.no_grad():
            gf.generate(model, prompt, args.new_tokens, batch_size=batch, interactive=False, draft_model=None,
                        **SAMPLING)
    return dict(times=_timed(call, args.repeats, args.warmup, device))


def child(args) -> None:
    """Run one system at one batch size and print its timings as one JSON line."""
    batch = int(args.batches)
    try:
        out = (run_gpt_fast if args.system == "gpt-fast" else run_ours)(args, batch)
    except Exception as e:  # reported in the table, not hidden (the whole traceback on stderr)
        import traceback
        traceback.print_exc()
        out = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    print("RESULT " + json.dumps(out), flush=True)


def _child_flags(args) -> List[str]:
    """The flags a child needs to rebuild ``args`` (everything but the batch sizes and system)."""
    flags = ["--device", args.device, "--new-tokens", str(args.new_tokens), "--prompt-len", str(args.prompt_len),
             "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    flags += ["--gpt-fast", args.gpt_fast] if args.gpt_fast else []
    return flags + [f for f, on in (("--no-compile", args.no_compile), ("--quick", args.quick)) if on]


def parent(args) -> Dict[str, Any]:
    device = torch.device(args.device)
    shape = QUICK if args.quick else LLAMA_1B
    bw = copy_bandwidth(device, (64 if args.quick else 2048) << 20)
    systems = (["ours"] + (["ours-tuned"] if args.tuned else []) + (["ours-autotune"] if args.autotune else [])
               + (["ours-combo"] if args.combo else []) + (["gpt-fast"] if args.gpt_fast else []))
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        for system in systems:
            cmd = [sys.executable, "-m", "benchmarks.llama_decode_benchmark", "--child", "--system", system,
                   "--batches", str(batch)] + _child_flags(args)
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:  # a row of its own, not the end of the table
                res = dict(error=f"no result within --timeout {args.timeout} s")
            else:
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                res = json.loads(line[-1][7:]) if line else dict(error=(proc.stderr or proc.stdout)[-300:])
            row = dict(system=system, batch=batch)
            if "times" in res:
                t = statistics.median(res["times"])
                tps = batch * args.new_tokens / t
                context = args.prompt_len + args.new_tokens / 2
                row.update(tokens_per_s=tps, ms_per_step=1000 * t / args.new_tokens,
                           pct_copy=100 * step_bytes(shape, batch, context) * (args.new_tokens / t) / bw)
            else:
                row["error"] = res.get("error")
            rows.append(row)
            print(row, flush=True)
    for row in rows:
        ref = next((r for r in rows if r["system"] == "gpt-fast" and r["batch"] == row["batch"]), None)
        if ref and "tokens_per_s" in row and "tokens_per_s" in ref:
            row["vs_gpt_fast"] = row["tokens_per_s"] / ref["tokens_per_s"]
    return dict(shape=shape, copy_bandwidth_gb_s=bw / 1e9, new_tokens=args.new_tokens, prompt_len=args.prompt_len,
                sampling=SAMPLING, rows=rows, weight_bytes=step_bytes(shape, 1, 0))


def render(result: Dict[str, Any], machine: Dict[str, Any], command: str) -> str:
    s = result["shape"]
    head = (f"Machine: {format_machine(machine)}\n\nCommand: `{command}`\n\n"
            f"### Decode, Llama-3.2-1B shape ({s['n_layers']} layers, {s['d_model']} wide, {s['n_heads']}/"
            f"{s['n_kv_heads']} heads, MLP {s['d_ff']}, vocabulary {s['vocab_size']:,}), random weights, bf16\n\n"
            f"{result['new_tokens']} new tokens after a {result['prompt_len']}-token prompt, temperature 0.8, top-k "
            f"200; weights {result['weight_bytes'] / 1e9:.2f} GB read per step; copy bandwidth "
            f"{result['copy_bandwidth_gb_s']:,.0f} GB/s (read + write) measured in this run.\n\n")
    rows = [[r["system"], r["batch"], r.get("tokens_per_s", r.get("error", "-")), r.get("ms_per_step", "-"),
             f"{r['pct_copy']:.0f}%" if "pct_copy" in r else "-",
             f"{r['vs_gpt_fast']:.2f}x" if "vs_gpt_fast" in r else "-"] for r in result["rows"]]
    return head + markdown_table(rows, ["system", "batch", "tokens/s", "ms/step", "% of copy bandwidth",
                                        "vs gpt-fast"], floatfmt=".4g") + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (with --quick) [cuda]")
    p.add_argument("--gpt-fast", default=None, metavar="DIR", help="a gpt-fast checkout: time its loop beside ours")
    p.add_argument("--batches", default="1,16", help="comma-separated batch sizes [1,16]")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens generated per call [256]")
    p.add_argument("--prompt-len", type=int, default=16, help="random prompt length [16]")
    p.add_argument("--repeats", type=int, default=5, help="timed calls (median reported) [5]")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (compilation) [2]")
    p.add_argument("--no-compile", action="store_true", help="eager rows (no torch.compile)")
    p.add_argument("--tuned", action="store_true",
                   help="also a row of ours compiled with coordinate-descent tuning (as gpt-fast compiles)")
    p.add_argument("--autotune", action="store_true",
                   help="also a row of ours compiled with inductor's max-autotune (Triton matrix kernels timed "
                        "against cuBLAS for each shape, with fused epilogues; minutes of compiling)")
    p.add_argument("--combo", action="store_true",
                   help="also a row of ours compiled with inductor's combo kernels (independent small kernels, "
                        "such as the elementwise work between two matrix products, launched as one)")
    p.add_argument("--quick", action="store_true", help="a tiny shape: a smoke test of the script")
    p.add_argument("--timeout", type=int, default=900, help="seconds per system and batch size [900]")
    p.add_argument("--out", default=None, help="results JSON [benchmarks/results/llama_decode_<device>.json]")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--system", default="ours", choices=("ours", "ours-tuned", "ours-autotune", "ours-combo", "gpt-fast"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("new_tokens", "prompt_len", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device here (use --device cpu --quick for a smoke test)")
    return args


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.child:
        child(args)
        return {}
    result = parent(args)
    machine = machine_description()
    command = "python -m benchmarks.llama_decode_benchmark " + " ".join(sys.argv[1:] if argv is None else argv)
    text = render(result, machine, command)
    print(text)
    out = args.out or f"benchmarks/results/llama_decode_{torch.device(args.device).type}.json"
    if not args.quick or args.out:
        write_results(out, result, machine, markdown=text)
    return result


if __name__ == "__main__":
    main()
