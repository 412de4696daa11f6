"""How fast is the fast decode path, against the ordinary loop and ``transformers``?  And training?

Run from the repository root::

    python -m benchmarks.fast_decode_benchmark --part cpu      # 6-layer model on this CPU (minutes)
    python -m benchmarks.fast_decode_benchmark --part gpu      # GPT-2-124M shape on CUDA, batch 1..64
    python -m benchmarks.fast_decode_benchmark --part train    # the "gpu" training preset: tokens/s, MFU
    python -m benchmarks.fast_decode_benchmark --part cpu --quick   # smoke test (tiny sizes)

Each part prints markdown tables and writes ``--out`` (default
``benchmarks/results/fast_decode_<part>.json``) with the tables next to it (``.md``).

What is measured
================

**Decode** (parts ``cpu`` and ``gpu``): greedy decoding of ``--new-tokens`` (256) tokens after a
random ``--prompt-len`` (16) token prompt, random weights (seeded), eval mode; tokens/s =
new tokens / seconds of one whole ``generate`` call (prefill and sampling included), median of
``--repeats`` timed calls after one untimed warm-up call (which pays any compilation and
CUDA-graph capture; its time is reported as "first call s").  GPU timings synchronize before
and after each call.  Modes:

* ``dynamic`` / ``static`` -- ``generate()``'s ordinary loop with ``DynamicKVCache`` /
  ``StaticKVCache`` (eager PyTorch, one Python step per token);
* ``fast`` -- ``generate(fast=True)``: :class:`transformer.FastDecoder`, the fixed-shape,
  sync-free step run eagerly; ``fast+graph`` -- the same step replayed as a CUDA graph (GPU);
* ``compiled`` -- ``generate(compile=True)``: the step through ``torch.compile`` (inductor; C++
  on CPU, Triton on GPU) and, on GPU, replayed as a CUDA graph;
* ``transformers dynamic`` / ``static`` -- ``GPT2LMHeadModel`` of the same shape carrying our
  weights (``benchmarks.decode_benchmark.build_hf_gpt2``), ``generate(do_sample=False,
  min_new_tokens=N)`` with its default and its static cache (transformers' own defaults apply).

"same tokens" compares each row with ``dynamic`` (ours) of the same dtype: exactly equal, or the
number of leading new tokens that agree.  In bfloat16 near-ties of random-weight logits can
flip under a different (equally valid) summation order, so the GPU part also checks the fast
and compiled paths against ``dynamic`` in float32 (TF32 off), where they must agree.

**Achieved fraction of memory bandwidth**: bytes one step must read (every weight once --
the tied embedding counted once as the output head, the learned position table as one row --
plus the keys and values of the average context: ``P + (N - 1) / 2`` tokens, times the batch)
times steps/s, over the copy bandwidth measured in the same run (best of ten large copies,
counting bytes read and written, as datasheet bandwidths do).

**Batched decode** (part ``gpu``): batch 1, 8, 32, 64 (``--batches``) of the same model, rows
of different random prompts: tokens/s counts every row's tokens.

**Training** (part ``train``): the ``gpu`` preset of ``transformer.training.PRESETS`` (model and
batch), random tokens, AdamW (fused), bfloat16 autocast, gradient clipping, the loss of
``train.py``, eager and ``torch.compile``d; ``--train-steps`` timed steps after
``--train-warmup`` (median step time).  MFU = ``6 * N * tokens/s / peak`` with ``N`` the
parameters (tied embedding once: the output head's matrix product is real work, the lookup
is not), and also with the attention term ``+ 12 * n_layers * d_model * T`` FLOPs per token;
``--peak-tflops`` (default 989: H100 SXM dense bf16, the datasheet number).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import statistics
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

import torch

from transformer import DecoderOnlyTransformer, FastDecoder, ModelConfig

from .common import format_machine, machine_description, markdown_table, set_threads, write_results

H100_BF16_DENSE_TFLOPS = 989.0


# --------------------------------------------------------------------------- measuring helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Bytes/s of a large copy ``dst.copy_(src)``, counting bytes read plus bytes written; the best
    of ``repeats`` (the machine's capability: on a shared CPU the median mostly measures the
    neighbours).  The buffers are filled with random data first: untouched pages may all map to
    one zero page and read far faster than memory.  Make ``nbytes`` much larger than the
    last-level cache."""
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.rand(n, device=device)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * n * 4 / min(times)


def step_bytes(model: DecoderOnlyTransformer, context: float, batch: int) -> float:
    """Bytes one decode step must read: weights once, plus ``batch`` rows of keys/values at ``context``."""
    c = model.config
    elem = model.decoder.lm_head.weight.element_size()
    n = model.num_parameters()
    if model.decoder.pos_emb is not None:
        n -= model.decoder.pos_emb.weight.numel() - c.d_model  # one row of the position table
    kv = 2 * c.n_layers * c.n_kv_heads * c.head_dim * context * batch
    return (n + kv) * elem


def first_divergence(out: torch.Tensor, ref: torch.Tensor, prompt_len: int) -> Optional[int]:
    """``None`` if equal, else the number of leading new-token columns on which all rows agree."""
    if out.shape == ref.shape and torch.equal(out, ref):
        return None
    n = min(out.shape[1], ref.shape[1])
    diff = (out[:, :n] != ref[:, :n]).any(0).nonzero()
    return int(diff[0]) - prompt_len if diff.numel() else n - prompt_len


@dataclasses.dataclass
class Mode:
    name: str
    run: Callable[[], torch.Tensor]
    first_s: float = float("nan")
    samples: List[float] = dataclasses.field(default_factory=list)
    output: Optional[torch.Tensor] = None
    error: Optional[str] = None


def time_modes(modes: List[Mode], repeats: int, device: torch.device) -> None:
    """Warm each mode up once (timed separately), then ``repeats`` rounds over all of them."""
    for m in modes:
        try:
            sync(device)
            t0 = time.perf_counter()
            m.output = m.run()
            sync(device)
            m.first_s = time.perf_counter() - t0
        except Exception:  # noqa: BLE001 -- report the failure, keep measuring the others
            m.error = traceback.format_exc(limit=-4)
            print(f"[{m.name} failed]\n{m.error}", file=sys.stderr, flush=True)
        print(f"  {m.name}: first call {m.first_s:.2f}s", file=sys.stderr, flush=True)
    for _ in range(repeats):
        for m in modes:
            if m.error:
                continue
            sync(device)
            t0 = time.perf_counter()
            m.output = m.run()
            sync(device)
            m.samples.append(time.perf_counter() - t0)


def decode_rows(modes: List[Mode], ref: Optional[Mode], n: int, prompt_len: int, batch: int,
                bytes_per_step: float, bandwidth: float, impl_of: Callable[[str], str]) -> List[Dict[str, Any]]:
    rows = []
    for m in modes:
        row: Dict[str, Any] = {"impl": impl_of(m.name), "mode": m.name, "batch": batch, "new_tokens": n,
                               "first_call_s": m.first_s, "error": m.error}
        if not m.error and m.samples:
            sec = statistics.median(m.samples)
            row.update(tokens_per_s=batch * n / sec, ms_per_step=1e3 * sec / n, samples_s=m.samples,
                       bandwidth_fraction=bytes_per_step * (n / sec) / bandwidth)
            if ref is not None and ref.output is not None and m is not ref:
                d = first_divergence(m.output, ref.output, prompt_len)
                row["same_tokens"] = d is None
                row["agreeing_new_tokens"] = n if d is None else d
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- decode parts
def _hf_mode(name, hf, prompt, n, static):
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)
    if static:
        kw["cache_implementation"] = "static"
    return Mode(name, lambda: hf.generate(prompt, **kw))


def decode_part(args, device: torch.device, config: ModelConfig, dtype: torch.dtype,
                batches=(1,)) -> Dict[str, Any]:
    from .decode_benchmark import build_hf_gpt2

    torch.manual_seed(args.seed)
    base = DecoderOnlyTransformer(config).eval()
    hf = None
    if not args.no_hf:
        try:
            hf = build_hf_gpt2(base).to(device=device, dtype=dtype).eval()
        except ImportError:
            print("[transformers not importable: its rows are skipped]", file=sys.stderr)
    ref32 = copy.deepcopy(base).to(device) if device.type == "cuda" and not args.quick else None
    model = base.to(device=device, dtype=dtype)
    n, P = args.new_tokens, args.prompt_len
    cap = 64 * -(-(P + n) // 64)
    bw = copy_bandwidth(device, args.copy_mib << 20)
    results: Dict[str, Any] = {"copy_bandwidth_GBps": bw / 1e9, "dtype": str(dtype).replace("torch.", ""),
                               "parameters": model.num_parameters(), "rows": []}
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s (read + write)", file=sys.stderr, flush=True)
    gen = torch.Generator().manual_seed(args.seed)
    cuda = device.type == "cuda"
    with torch.inference_mode():
        for B in batches:
            prompt = torch.randint(0, config.vocab_size, (B, P), generator=gen).to(device)
            modes = [Mode("dynamic", lambda: model.generate(prompt, n))]
            if not args.only_variants:
                modes.append(Mode("static", lambda: model.generate(prompt, n, cache_implementation="static")))
                fast = FastDecoder(model, batch_size=B, max_cache_len=cap, cuda_graph=False)
                modes.append(Mode("fast", lambda: fast.generate(prompt, n)))
                if cuda:
                    fast_g = FastDecoder(model, batch_size=B, max_cache_len=cap)
                    modes.append(Mode("fast+graph", lambda: fast_g.generate(prompt, n)))
                if not args.no_compile:
                    modes.append(Mode("compiled", lambda: model.generate(prompt, n, compile=True)))
            if B == batches[0]:
                for v in args.variants.split(",") if args.variants else ():
                    modes.append(variant_mode(v, model, B, cap, prompt, n))
            if hf is not None and (B == 1 or args.hf_batched) and not args.only_variants:
                modes += [_hf_mode("transformers dynamic", hf, prompt, n, False),
                          _hf_mode("transformers static", hf, prompt, n, True)]
            print(f"batch {B}:", file=sys.stderr, flush=True)
            time_modes(modes, args.repeats, device)
            results["rows"] += decode_rows(modes, modes[0], n, P, B, step_bytes(model, P + (n - 1) / 2, B), bw,
                                           lambda name: "transformers" if name.startswith("transformers") else "ours")
            del modes
            gc.collect()
            save_partial(args, results)
            if B == batches[0] and cuda and not args.no_compile and not args.quick and not args.no_extras:
                results["extra"] = gpu_extras(args, model, ref32, config, cap, bw, gen)
                save_partial(args, results)
    return results


#: ``--variants``: name -> (FastDecoder keyword arguments, row label)
VARIANTS = {
    "cdt": (dict(compile=True, compile_options={"coordinate_descent_tuning": True}),
            "compiled, coordinate_descent_tuning"),
    "autotune": (dict(compile=True, compile_options={"max_autotune": True}), "compiled, max_autotune"),
    "autotune+cdt": (dict(compile=True, compile_options={"max_autotune": True, "coordinate_descent_tuning": True}),
                     "compiled, max_autotune + coordinate_descent_tuning"),
    "plain": (dict(compile=True, compile_options={}), "compiled, plain inductor settings"),
    "cpp_wrapper": (dict(compile=True, compile_options={"cpp_wrapper": True}),
                    "compiled, cpp_wrapper (the graph's kernel calls in C++, not Python)"),
    "decompose": (dict(compile=True, compile_options={"decompose_mem_bound_mm": True}),
                  "compiled, decompose_mem_bound_mm (matrix-vector products as inductor loops)"),
    "step": (dict(), "fast (+graph on CUDA), a FastDecoder of its own"),
}


def variant_mode(name: str, model, batch: int, cap: int, prompt, n: int) -> Mode:
    if name not in VARIANTS:
        raise SystemExit(f"--variants: unknown variant {name!r}; expected some of {sorted(VARIANTS)}")
    kwargs, label = VARIANTS[name]
    dec = FastDecoder(model, batch_size=batch, max_cache_len=cap, **kwargs)
    return Mode(label, lambda: dec.generate(prompt, n))


def save_partial(args, results: Dict[str, Any]) -> None:
    """Write what is measured so far next to ``--out`` (``.partial.json``): a run cut short by a
    time limit still leaves its numbers."""
    import json
    from pathlib import Path

    out = Path(args.out or f"benchmarks/results/fast_decode_{args.part}.json").with_suffix(".partial.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))


def gpu_extras(args, model, ref32, config, cap, bw, gen) -> List[Dict[str, Any]]:
    """Batch 1: sampling and EOS checks on the compiled path, and the float32 same-tokens check."""
    device, n, P = torch.device("cuda"), args.new_tokens, args.prompt_len
    prompt = torch.randint(0, config.vocab_size, (1, P), generator=gen).to(device)
    sampling = dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.95)
    modes = [Mode("compiled, sampling (T=0.8, top-k 50, top-p 0.95)",
                  lambda: model.generate(prompt, n, compile=True, generator=torch.Generator(device).manual_seed(0),
                                         **sampling)),
             Mode("compiled, greedy, eos checked every 16 steps (never produced)",
                  lambda: model.generate(prompt, n, compile=True, eos_token_id=config.vocab_size - 1))]
    time_modes(modes, args.repeats, device)
    rows = decode_rows(modes, None, n, P, 1, step_bytes(model, P + (n - 1) / 2, 1), bw, lambda _: "ours")
    # float32, TF32 off: the fast and compiled paths must give the eager tokens exactly
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ref32.eval()
    checks = [Mode("float32 dynamic", lambda: ref32.generate(prompt, n)),
              Mode("float32 fast+graph", lambda: FastDecoder(ref32, max_cache_len=cap).generate(prompt, n)),
              Mode("float32 compiled", lambda: ref32.generate(prompt, n, compile=True))]
    time_modes(checks, 1, device)
    rows += decode_rows(checks, checks[0], n, P, 1, step_bytes(ref32, P + (n - 1) / 2, 1), bw, lambda _: "ours")
    return rows


# --------------------------------------------------------------------------- training
def train_part(args, device: torch.device) -> Dict[str, Any]:
    from transformer import training as T

    model_over, train_over = T.preset_overrides("gpu")
    model_over["vocab_size"] = train_over["vocab_size"]
    if args.quick:
        model_over.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
        train_over.update(batch_size=4, block_size=64, vocab_size=256)
        model_over["vocab_size"] = 256
    mcfg = ModelConfig(**model_over)
    B, S = train_over["batch_size"], train_over["block_size"]
    dtype = T.resolve_dtype("auto", device)
    rows = []
    for compiled in (False, True) if not args.no_compile else (False,):
        torch.manual_seed(args.seed)
        raw = DecoderOnlyTransformer(mcfg).to(device)
        model = torch.compile(raw) if compiled else raw
        opt = T.configure_optimizer(raw, train_over["lr"], 0.1, (0.9, 0.95), device)
        g = torch.Generator().manual_seed(args.seed)
        data = torch.randint(0, mcfg.vocab_size, (8, B, S + 1), generator=g).to(device)
        n_params = raw.num_parameters()

        def step(i):
            x, y = data[i % 8, :, :-1], data[i % 8, :, 1:]
            with T.autocast(device, dtype):
                loss = T.lm_loss(model, x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        sync(device)
        t0 = time.perf_counter()
        for i in range(args.train_warmup):
            step(i).item()
        sync(device)
        warm = time.perf_counter() - t0
        times = []
        for i in range(args.train_steps):
            sync(device)
            t0 = time.perf_counter()
            loss = step(i)
            sync(device)
            times.append(time.perf_counter() - t0)
        sec = statistics.median(times)
        tps = B * S / sec
        flops_tok = 6 * n_params
        flops_tok_attn = flops_tok + 12 * mcfg.n_layers * mcfg.d_model * S
        peak = args.peak_tflops * 1e12
        rows.append({"compiled": compiled, "parameters": n_params, "batch": B, "block": S,
                     "dtype": str(dtype).replace("torch.", ""), "warmup_s": warm, "step_ms": 1e3 * sec,
                     "tokens_per_s": tps, "mfu_6N": flops_tok * tps / peak, "mfu_with_attention": flops_tok_attn * tps / peak,
                     "final_loss": float(loss), "step_samples_s": times})
        print(f"train compiled={compiled}: {tps:,.0f} tokens/s, MFU {rows[-1]['mfu_6N']:.1%}", file=sys.stderr,
              flush=True)
        del model, raw, opt, data
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"model": mcfg.to_dict(), "peak_tflops": args.peak_tflops, "rows": rows,
            "measured_matmul_tflops": matmul_tflops(device, 256 if args.quick else 8192)}


def matmul_tflops(device: torch.device, n: int) -> float:
    """bf16 (GPU) / fp32 (CPU) ``n x n x n`` matrix product rate on random data, median of 10."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e12


# --------------------------------------------------------------------------- report
def render(part: str, result: Dict[str, Any], machine: Dict[str, Any], command: str) -> str:
    lines = [f"## Fast decode benchmark: {part}", "", f"Machine: {format_machine(machine)}"]
    if machine.get("gpu"):
        lines.append(f"GPU: {machine['gpu']}")
    lines += ["", f"Command: `{command}`", ""]
    if part in ("cpu", "gpu"):
        lines.append(f"Model: {result['model']}; {result['parameters'] / 1e6:.1f}M parameters, {result['dtype']}; "
                     f"prompt {result['prompt_len']} tokens, {result['new_tokens']} new tokens, greedy. "
                     f"Copy bandwidth measured: {result['copy_bandwidth_GBps']:.1f} GB/s (read + write).")
        lines.append("")
        table = []
        for r in result["rows"] + result.get("extra", []):
            table.append([r["batch"], r["impl"], r["mode"],
                          round(r["tokens_per_s"], 1) if "tokens_per_s" in r else "failed",
                          round(r["ms_per_step"], 3) if "ms_per_step" in r else "-",
                          f"{r['bandwidth_fraction']:.1%}" if "bandwidth_fraction" in r else "-",
                          round(r["first_call_s"], 2),
                          ("yes" if r["same_tokens"] else f"first {r['agreeing_new_tokens']}")
                          if "same_tokens" in r else "-"])
        lines.append(markdown_table(table, ["batch", "impl", "mode", "tokens/s", "ms/step", "of copy bandwidth",
                                            "first call s", "same tokens as dynamic"], floatfmt=".5g"))
        vs = result.get("ratios", [])
        if vs:
            lines += ["", markdown_table([[v["ours"], v["theirs"], v["batch"], f"{v['ratio']:.2f}x"] for v in vs],
                                         ["ours", "transformers", "batch", "ours / theirs"])]
    else:
        lines.append(f"Model: gpu preset {result['model']['d_model']}-wide, {result['model']['n_layers']} layers; "
                     f"MFU against the datasheet peak {result['peak_tflops']:g} TFLOP/s (bf16 dense); an "
                     f"8192^3 bf16 matrix product measured {result['measured_matmul_tflops']:.0f} TFLOP/s here.")
        lines.append("")
        lines.append(markdown_table(
            [[r["compiled"], r["parameters"] / 1e6, r["batch"] * r["block"], round(r["step_ms"], 2),
              round(r["tokens_per_s"]), f"{r['mfu_6N']:.1%}", f"{r['mfu_with_attention']:.1%}",
              round(r["warmup_s"], 1)] for r in result["rows"]],
            ["torch.compile", "params (M)", "tokens/step", "step ms", "tokens/s", "MFU (6N)", "MFU (+attention)",
             "warm-up s"], floatfmt=".4g"))
    text = "\n".join(lines)
    print(text + "\n", flush=True)
    return text


def ratios(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    by = {(r["mode"], r["batch"]): r for r in rows if "tokens_per_s" in r}
    out = []
    for (mode, b), r in sorted(by.items(), key=lambda kv: kv[0][1]):
        if r["impl"] != "ours":
            continue
        for theirs in ("transformers dynamic", "transformers static"):
            t = by.get((theirs, b))
            if t:
                out.append({"ours": mode, "theirs": theirs, "batch": b, "ratio": r["tokens_per_s"] / t["tokens_per_s"]})
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fast_decode_benchmark",
                                description="Decode throughput of the fast path (CPU or GPU) against the ordinary "
                                            "loop and transformers, and training throughput / MFU on a GPU.")
    p.add_argument("--part", choices=("cpu", "gpu", "train"), required=True,
                   help="cpu: 6-layer 384-wide model on this CPU; gpu: GPT-2-124M shape in bf16 on CUDA, batches; "
                        "train: the gpu training preset's tokens/s and MFU")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of every row (numbers mean nothing)")
    p.add_argument("--out", default=None, help="JSON to write [benchmarks/results/fast_decode_<part>.json]")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens generated per call [256]")
    p.add_argument("--prompt-len", type=int, default=16, help="random prompt length [16]")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per mode (median reported) [5]")
    p.add_argument("--batches", default="1,8,32,64", help="gpu part: batch sizes [1,8,32,64]")
    p.add_argument("--threads", type=int, default=1, help="cpu part: torch threads [1]")
    p.add_argument("--copy-mib", type=int, default=None, help="copy-bandwidth buffer, MiB [cpu 256, gpu 2048]")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers rows")
    p.add_argument("--hf-batched", action="store_true", help="also time transformers at batch > 1")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--variants", default="", help=f"extra FastDecoder rows at the first batch size, comma-separated: "
                                                  f"{', '.join(sorted(VARIANTS))}")
    p.add_argument("--only-variants", action="store_true", help="time only dynamic (the reference) and --variants")
    p.add_argument("--no-extras", action="store_true",
                   help="gpu part: skip the sampling / eos / float32 rows at batch 1")
    p.add_argument("--train-steps", type=int, default=30, help="train part: timed steps [30]")
    p.add_argument("--train-warmup", type=int, default=8, help="train part: untimed steps first [8]")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                   help=f"train part: peak bf16 dense TFLOP/s for MFU [{H100_BF16_DENSE_TFLOPS:g}: H100 SXM]")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.part == "cpu":
        device = torch.device("cpu")
        set_threads(args.threads)
        config = (ModelConfig(vocab_size=8192, d_model=384, n_layers=6, n_heads=6, max_seq_len=args.prompt_len +
                              args.new_tokens, pos_encoding="learned") if not args.quick else
                  ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_seq_len=64))
        dtype, batches = torch.float32, (1,)
    else:
        if not torch.cuda.is_available() and not args.quick:
            raise SystemExit(f"--part {args.part} needs a CUDA GPU (torch.cuda.is_available() is False); "
                             f"--quick runs its smoke test on the CPU")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        config = (ModelConfig(vocab_size=50257, d_model=768, n_layers=12, n_heads=12, max_seq_len=1024,
                              pos_encoding="learned") if not args.quick else
                  ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_seq_len=64))
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        batches = tuple(int(b) for b in args.batches.split(","))
    if args.quick:
        args.new_tokens, args.prompt_len, args.repeats = min(args.new_tokens, 24), min(args.prompt_len, 8), 1
    if args.copy_mib is None:
        args.copy_mib = 16 if args.quick else (256 if device.type == "cpu" else 2048)
    command = "python -m benchmarks.fast_decode_benchmark " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.part == "train":
        result = train_part(args, device)
    else:
        result = decode_part(args, device, config, dtype, batches)
        result.update(model=f"{config.n_layers} layers, d_model {config.d_model}, {config.n_heads} heads, "
                            f"vocab {config.vocab_size}, {config.pos_encoding} positions",
                      prompt_len=args.prompt_len, new_tokens=args.new_tokens, threads=torch.get_num_threads())
        result["ratios"] = ratios(result["rows"])
    machine = machine_description()
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name()
        machine["cuda"] = torch.version.cuda
    text = render(args.part, result, machine, command)
    out = args.out or f"benchmarks/results/fast_decode_{args.part}{'_quick' if args.quick else ''}.json"
    path = write_results(out, result, machine=machine, command=command, markdown=text)
    path.with_suffix(".partial.json").unlink(missing_ok=True)  # the whole result is written
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
