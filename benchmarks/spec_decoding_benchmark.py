"""How much does speculative decoding speed up the target model, and why?

Run from the repository root::

    python -m benchmarks.spec_decoding_benchmark --target out --draft out-draft --dtype bfloat16 \
        --draft-mode compile --reference --repeats 5 --draft-lengths 2,3,4,6,8,12     # the README's table
    python -m benchmarks.spec_decoding_benchmark --target out --draft out-draft   # eager, float32
    python -m benchmarks.spec_decoding_benchmark --random                         # no checkpoints needed
    python -m benchmarks.spec_decoding_benchmark --random --quick                 # smoke test (seconds)

It prints GitHub-markdown tables (machine first) and saves the numbers as JSON (``--out``,
default ``benchmarks/results/spec_decoding_cpu.json``) with the tables next to it (``.md``);
``--plot FILE.png`` also draws tokens per target pass and speedup against the draft length.

What is measured
================

Models.  ``--target DIR`` / ``--draft DIR`` load checkpoints written by ``train.py``
(``transformer.checkpoint.load_model``; a run directory means its ``best/``).  The prompts are
``--prompt`` (repeatable; default: four play openings, three of them from the held-out plays)
encoded with the target's tokenizer; a timed call generates for each prompt in turn.
``--dtype`` casts the target (baseline and verification alike; the draft stays float32);
``--draft-mode`` runs the draft model eagerly, on ``FastDecoder`` steps, or on compiled
``FastDecoder`` steps (``ModelDrafter(draft, compile=True)``: at temperature 0 all ``k`` guesses of
a round in one compiled call; the compile happens in the untimed warm-up round).  Without a draft checkpoint,
``--draft-layers N`` cuts the target's first ``N`` layers into a draft
(:func:`spec_decoding.truncated_draft`).  ``--random`` instead builds
:func:`spec_decoding.make_demo_pair` (an 8-layer random target whose later layers only nudge
the output, and its first layer as the draft) with a random prompt.

For each temperature in ``--temperatures`` (default 0 and 0.8; no top-k / top-p):

* **baseline** -- ``target.generate(prompt, N, do_sample=T > 0, temperature=T)`` with a dynamic
  KV cache: plain cached decoding, one target pass per token.
* **float32 baseline** (when ``--dtype`` is not float32) -- the same call on a float32 copy of
  the target, timed in the same round-robin: on a CPU eager float32 decoding is faster than
  bfloat16 (a one-row bfloat16 product is slow), so ``speedup vs float32`` is the speedup over
  the fastest plain eager decoding of the target, the honest figure for a bfloat16 target.
* **draft model, k = ...** -- ``speculative_generate(target, draft, prompt, N,
  num_draft_tokens=k, temperature=T)`` for each ``k`` in ``--draft-lengths``, plus one
  ``adaptive=True`` row (starting at k = 4).
* **prompt lookup** -- ``PromptLookupDrafter(max_ngram=3)`` with ``k = 4`` on a prompt made of a
  passage followed by its first half (text that a trained language model continues by
  copying the rest), against its own baseline on that prompt.  Random weights do not copy, so
  with ``--random`` this row shows ~0 acceptance: the honest result for a model that does not
  repeat its context.
* **reference** (``--reference``) -- plain greedy decoding of the target in float32 and
  bfloat16 (eager) and with the compiled fast path (``generate(compile=True)``, float32), for
  context: what the same target costs without speculation, decoded other ways.

Prompts longer than ``max_seq_len - N`` keep their last tokens.

Every run generates exactly ``N = --new-tokens`` tokens (``eos_token_id=None``) with the same
seed.  Calls are timed round-robin (baseline, then each speculative setting, repeated
``--repeats`` times after ``--warmup`` untimed rounds), so background load hits all alike;
**reported: the median** wall time.  speedup = baseline median / speculative median.
Acceptance rate, tokens per target pass and passes come from the (seeded, identical) timed
runs.  At temperature 0 the script also checks that the speculative tokens equal the
baseline's (``same tokens``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import torch

from spec_decoding import ModelDrafter, PromptLookupDrafter, make_demo_pair, speculative_generate, truncated_draft

from .common import (float_list, format_machine, int_list, machine_description, markdown_table, set_threads,
                     write_results)

try:  # progress bar is a nicety, never a requirement
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

DEFAULT_OUT = "benchmarks/results/spec_decoding_cpu.json"
QUICK_OUT = "benchmarks/results/spec_decoding_cpu_quick.json"
DEFAULT_PROMPTS = ("ROMEO:\nBut soft, what light through yonder window breaks?\n",
                   "HAMLET:\nO, that this too too solid flesh would melt,\n",  # the rest: held-out plays
                   "PROSPERO:\nOur revels now are ended. These our actors,\n",
                   "KATHARINA:\nFie, fie! unknit that threatening unkind brow,\n")
PASSAGE = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
           "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n")


@dataclass
class SpecBenchConfig:
    """What the benchmark varies.  :func:`quick_config` is the smoke-test preset."""

    new_tokens: int = 128
    draft_lengths: Tuple[int, ...] = (1, 2, 3, 4, 6, 8)
    adaptive: bool = True
    prompt_lookup: bool = True
    temperatures: Tuple[float, ...] = (0.0, 0.8)
    repeats: int = 3
    warmup: int = 1
    random_prompt_len: int = 32
    seed: int = 0


def quick_config() -> SpecBenchConfig:
    return SpecBenchConfig(new_tokens=16, draft_lengths=(2,), repeats=1, warmup=0)


def _time_once(fn: Callable[[], Any]) -> float:
    """Wall time of ``fn()`` in seconds (CUDA work included: synchronised before and after)."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _merge(stats_list):
    """Sum the counters of several runs (one per prompt) into one ``SpecDecodingStats``."""
    total = dataclasses.replace(stats_list[0], proposed_per_round=[], accepted_per_round=[])
    for name in ("prompt_tokens", "generated_tokens", "target_forward_passes", "draft_forward_passes",
                 "proposed_tokens", "accepted_tokens", "wall_time_s"):
        setattr(total, name, sum(getattr(st, name) for st in stats_list))
    for st in stats_list:
        total.proposed_per_round += st.proposed_per_round
        total.accepted_per_round += st.accepted_per_round
    return total


def bench_prompt(target, prompts: List[torch.Tensor], cfg: SpecBenchConfig, temperature: float,
                 drafters: List[Tuple[str, Any, Dict[str, Any]]], bar=None,
                 float32_target=None) -> List[Dict[str, Any]]:
    """Time the baseline and each ``(label, drafter, kwargs)``; one row per drafter.

    One timed *call* generates ``N`` tokens for every prompt in ``prompts`` in turn, so the
    numbers average over the prompts (ms/token = call time / (N * len(prompts))).
    ``float32_target`` (a float32 copy of a lower-precision target) adds a second baseline in
    the same round-robin: plain decoding in float32, the fastest eager way on a CPU, so that
    each row also says its speedup over that (``speedup_vs_float32``)."""
    N, seed = cfg.new_tokens, cfg.seed
    outputs: Dict[str, Any] = {}

    def plain(model, key):
        def run():
            outs = []
            for prompt in prompts:
                g = torch.Generator(device=prompt.device).manual_seed(seed)
                outs.append(model.generate(prompt, N, do_sample=temperature > 0, temperature=temperature or 1.0,
                                           generator=g, eos_token_id=None))
            outputs[key] = outs
        return run

    def speculative(label, drafter, kwargs):
        def run():
            runs = [speculative_generate(target, drafter, prompt, N, temperature=temperature, seed=seed,
                                         eos_token_id=None, **kwargs) for prompt in prompts]
            outputs[label] = ([tokens for tokens, _ in runs], _merge([st for _, st in runs]))
        return run

    calls = [("baseline", plain(target, "baseline"))]
    if float32_target is not None:
        calls.append(("baseline float32", plain(float32_target, "baseline float32")))
    calls += [(label, speculative(label, d, kw)) for label, d, kw in drafters]
    samples: Dict[str, List[float]] = {label: [] for label, _ in calls}
    for r in range(cfg.warmup + cfg.repeats):
        for label, fn in calls:
            t = _time_once(fn)
            if r >= cfg.warmup:
                samples[label].append(t)
            if bar is not None:
                bar.update()
    base = statistics.median(samples["baseline"])
    base32 = statistics.median(samples["baseline float32"]) if float32_target is not None else None
    n_tokens = N * len(prompts)
    rows = []
    for label, drafter, kw in drafters:
        tokens, stats = outputs[label]
        t = statistics.median(samples[label])
        same = all(torch.equal(a, b) for a, b in zip(tokens, outputs["baseline"]))
        rows.append({
            "drafter": label, "temperature": temperature, "num_draft_tokens": kw.get("num_draft_tokens"),
            "adaptive": kw.get("adaptive", False), "new_tokens": stats.generated_tokens,
            "acceptance_rate": stats.acceptance_rate, "tokens_per_target_pass": stats.tokens_per_target_pass,
            "target_passes": stats.target_forward_passes, "draft_passes": stats.draft_forward_passes,
            "spec_ms_per_token": 1e3 * t / n_tokens, "baseline_ms_per_token": 1e3 * base / n_tokens,
            "speedup": base / t, "same_tokens_as_target": same if temperature == 0 else None,
            "baseline_float32_ms_per_token": None if base32 is None else 1e3 * base32 / n_tokens,
            "speedup_vs_float32": None if base32 is None else base32 / t,
            "spec_samples_s": samples[label], "baseline_samples_s": samples["baseline"],
        })
    return rows


def reference_rows(target, prompts: List[torch.Tensor], cfg: SpecBenchConfig) -> List[Dict[str, Any]]:
    """Plain greedy decoding of the target in other modes, for context: eager float32 and
    bfloat16, and the compiled fast path (``generate(compile=True)``, float32).  Same timing
    protocol as the table rows (round-robin, median)."""
    N = cfg.new_tokens
    models = {"float32": copy.deepcopy(target).float(), "bfloat16": copy.deepcopy(target).to(torch.bfloat16)}
    modes = [("plain cached decoding, float32 (eager)", models["float32"], {}),
             ("plain cached decoding, bfloat16 (eager)", models["bfloat16"], {}),
             ("plain decoding, float32, FastDecoder (compiled)", models["float32"], {"compile": True})]
    samples: Dict[str, List[float]] = {label: [] for label, _, _ in modes}
    for r in range(cfg.warmup + 1 + cfg.repeats):  # +1: the first compiled call compiles
        for label, model, kw in modes:
            t = _time_once(lambda: [model.generate(p, N, eos_token_id=None, **kw) for p in prompts])
            if r > cfg.warmup:
                samples[label].append(t)
    return [{"mode": label, "ms_per_token": 1e3 * statistics.median(samples[label]) / (N * len(prompts)),
             "samples_s": samples[label]} for label, _, _ in modes]


def run_spec_benchmark(target, draft, prompts: List[torch.Tensor], lookup_prompt: torch.Tensor,
                       cfg: SpecBenchConfig, progress: bool = False, draft_mode: str = "eager",
                       reference: bool = False) -> Dict[str, Any]:
    """Every row of the benchmark (see the module docstring) as a JSON-able dict."""
    drafter = ModelDrafter(draft, fast=draft_mode == "fast", compile=draft_mode == "compile")
    drafters = [(f"draft model, k={k}", drafter, dict(num_draft_tokens=k)) for k in cfg.draft_lengths]
    if cfg.adaptive:
        drafters.append(("draft model, adaptive (k0=4)", drafter, dict(num_draft_tokens=4, adaptive=True)))
    lookup = [("prompt lookup, k=4", PromptLookupDrafter(max_ngram=3), dict(num_draft_tokens=4))]
    # A lower-precision target: also time plain float32 decoding, round-robin with the rest.
    target32 = None if next(target.parameters()).dtype == torch.float32 else copy.deepcopy(target).float()
    baselines = 1 + (target32 is not None)
    calls = ((len(drafters) + baselines + (1 + baselines if cfg.prompt_lookup else 0))
             * (cfg.warmup + cfg.repeats) * len(cfg.temperatures))
    bar = tqdm(total=calls, desc="generate calls", leave=False, file=sys.stderr) if progress and tqdm else None
    rows, lookup_rows = [], []
    with torch.inference_mode():
        for temperature in cfg.temperatures:
            rows += bench_prompt(target, prompts, cfg, temperature, drafters, bar, target32)
            if cfg.prompt_lookup:
                lookup_rows += bench_prompt(target, [lookup_prompt], cfg, temperature, lookup, bar, target32)
    ref = reference_rows(target, prompts, cfg) if reference else []  # (copies the model: not in inference mode)
    if bar is not None:
        bar.close()
    return {"config": dataclasses.asdict(cfg), "prompt_tokens": [p.shape[1] for p in prompts],
            "lookup_prompt_tokens": lookup_prompt.shape[1], "draft_model": rows, "prompt_lookup": lookup_rows,
            "reference": ref, "target_dtype": str(next(target.parameters()).dtype).replace("torch.", ""),
            "draft_mode": draft_mode,
            "target_params": sum(p.numel() for p in target.parameters()),
            "draft_params": sum(p.numel() for p in draft.parameters())}


def _table(rows: List[Dict[str, Any]]) -> str:
    headers = ["drafter", "T", "acceptance", "tokens / target pass", "target passes", "ms/token (spec)",
               "ms/token (target alone)", "speedup", "same tokens"]
    cells = [[r["drafter"], f"{r['temperature']:g}", r["acceptance_rate"], r["tokens_per_target_pass"],
              r["target_passes"], r["spec_ms_per_token"], r["baseline_ms_per_token"], r["speedup"],
              r["same_tokens_as_target"]] for r in rows]
    if rows and rows[0].get("speedup_vs_float32") is not None:
        headers[8:8] = ["ms/token (float32 target alone)", "speedup vs float32"]
        for cell, r in zip(cells, rows):
            cell[8:8] = [r["baseline_float32_ms_per_token"], r["speedup_vs_float32"]]
    return markdown_table(cells, headers, floatfmt=".3g")


def render(result: Dict[str, Any], machine: Dict[str, Any], file=None) -> str:
    """The markdown report: machine, models, then the tables."""
    n = result["config"]["new_tokens"]
    lengths = result["prompt_tokens"]
    draft_mode = {"eager": "eager", "fast": "FastDecoder steps", "compile": "compiled FastDecoder steps"}
    parts = [f"Machine: {format_machine(machine)}" + (f"; device: {result['device']}"
                                                      if result.get("device", "cpu") != "cpu" else ""),
             f"Target {result['target_params'] / 1e6:.3g}M parameters in {result.get('target_dtype', 'float32')} "
             f"(eager; the baseline is the same model's plain cached decoding"
             + (", and plain decoding of a float32 copy, timed in the same round-robin"
                if result.get("target_dtype", "float32") != "float32" else "") + "), draft "
             f"{result['draft_params'] / 1e6:.3g}M in float32 ({draft_mode[result.get('draft_mode', 'eager')]}); "
             f"{n} new tokens per prompt; median of {result['config']['repeats']} timed calls.",
             f"### Draft model ({len(lengths)} prompt(s) of {', '.join(map(str, lengths))} tokens)\n\n"
             f"{_table(result['draft_model'])}"]
    if result["prompt_lookup"]:
        parts.append(f"### Prompt lookup (repeated-text prompt, {result['lookup_prompt_tokens']} tokens)\n\n"
                     f"{_table(result['prompt_lookup'])}")
    if result.get("reference"):
        cells = [[r["mode"], r["ms_per_token"]] for r in result["reference"]]
        parts.append("### The target alone, other ways (greedy, same prompts)\n\n"
                     + markdown_table(cells, ["plain decoding of the target", "ms/token"], floatfmt=".3g"))
    text = "\n\n".join(parts)
    print(text + "\n", file=file or sys.stdout, flush=True)
    return text


def plot(result: Dict[str, Any], path) -> Path:
    """Save tokens per target pass and speedup against draft length (one line per temperature) as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=80)
    for temperature in result["config"]["temperatures"]:
        rows = sorted((r for r in result["draft_model"] if r["temperature"] == temperature and not r["adaptive"]),
                      key=lambda r: r["num_draft_tokens"])
        ks = [r["num_draft_tokens"] for r in rows]
        ax1.plot(ks, [r["tokens_per_target_pass"] for r in rows], "o-", label=f"T={temperature:g}")
        ax2.plot(ks, [r["speedup"] for r in rows], "o-", label=f"T={temperature:g}")
    ax1.set_title("tokens per target pass", fontsize=10)
    ax2.set_title("wall-clock speedup vs target alone", fontsize=10)
    ax2.axhline(1, color="grey", lw=0.8)
    for ax in (ax1, ax2):
        ax.set_xlabel("draft length k")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def load_models(args) -> Tuple[Any, Any, List[torch.Tensor], torch.Tensor]:
    """``(target, draft, prompts, lookup_prompt)`` from checkpoints or (``--random``) the demo pair."""
    g = torch.Generator().manual_seed(args.seed)
    if args.random:
        target, draft = make_demo_pair(seed=args.seed)
        V = target.config.vocab_size
        prompt = torch.randint(0, V, (1, args.random_prompt_len), generator=g)
        passage = torch.randint(0, V, (1, 32), generator=g)
        return target.to(getattr(torch, args.dtype)), draft, [prompt], torch.cat([passage, passage[:, :16]], dim=1)
    if args.target is None:
        raise SystemExit("give --target DIR (with --draft DIR or --draft-layers N), or --random")
    from transformer.checkpoint import load_model
    target, tokenizer, _ = load_model(args.target)  # a run directory means its best/
    if args.draft is not None:
        draft, _, _ = load_model(args.draft)
    elif args.draft_layers is not None:
        draft = truncated_draft(target, args.draft_layers)
    else:
        raise SystemExit("give --draft DIR (a trained draft checkpoint) or --draft-layers N (the target's first "
                         "N layers as the draft)")
    if tokenizer is None:
        raise SystemExit(f"{args.target} holds no tokenizer; cannot encode --prompt")
    prompts = [torch.tensor([tokenizer.encode(text)], dtype=torch.long) for text in (args.prompt or DEFAULT_PROMPTS)]
    half = PASSAGE[:len(PASSAGE) // 2]
    lookup = torch.tensor([tokenizer.encode(PASSAGE + "\n" + half)], dtype=torch.long)
    return target.to(getattr(torch, args.dtype)), draft, prompts, lookup


def fit_prompt(ids: torch.Tensor, target, draft, new_tokens: int) -> torch.Tensor:
    """Keep the last tokens of ``ids`` so that prompt + ``new_tokens`` fits both models' max_seq_len."""
    room = min(target.config.max_seq_len, draft.config.max_seq_len) - new_tokens
    if room < 1:
        raise SystemExit(f"--new-tokens {new_tokens} leaves no room for a prompt in max_seq_len="
                         f"{min(target.config.max_seq_len, draft.config.max_seq_len)}")
    if ids.shape[1] > room:
        print(f"note: prompt of {ids.shape[1]} tokens cut to its last {room} to fit max_seq_len", file=sys.stderr)
        ids = ids[:, -room:]
    return ids


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.spec_decoding_benchmark",
        description="Speculative decoding against plain cached decoding of the target: acceptance rate, "
                    "tokens per target pass and wall-clock speedup for several draft lengths, at temperature 0 "
                    "and 0.8, plus prompt lookup on repeated text. Prints markdown tables and writes JSON.")
    p.add_argument("--target", default=None, help="target checkpoint (run directory or checkpoint directory)")
    p.add_argument("--draft", default=None, help="draft checkpoint (same tokenizer as the target)")
    p.add_argument("--draft-layers", type=int, default=None,
                   help="no draft checkpoint: use the target's first N layers as the draft")
    p.add_argument("--random", action="store_true",
                   help="no checkpoints: a random 8-layer target and its first layer as the draft")
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt text for trained checkpoints (repeat for several; default: four play openings, "
                        "three from held-out plays)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="the target's dtype, for the baseline and the verification passes alike (the draft stays "
                        "float32) [default: float32]")
    p.add_argument("--draft-mode", choices=("eager", "fast", "compile"), default="eager",
                   help="how the draft model runs: the model's ordinary forward, FastDecoder steps, or compiled "
                        "FastDecoder steps (greedy drafts: one compiled call per round) [default: eager]")
    p.add_argument("--no-adaptive", action="store_true", help="skip the adaptive-draft-length row")
    p.add_argument("--no-prompt-lookup", action="store_true", help="skip the prompt-lookup table")
    p.add_argument("--device", default="cpu", help="cpu or cuda [default: cpu]")
    p.add_argument("--reference", action="store_true",
                   help="also time plain decoding of the target in float32, bfloat16 and compiled (context)")
    p.add_argument("--quick", action="store_true", help="smoke test: 16 tokens, k=2 and adaptive, one timed call")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per call (default 128; --quick: 16)")
    p.add_argument("--draft-lengths", type=int_list, default=None, metavar="K[,K...]",
                   help="draft lengths k to compare (default 1,2,3,4,6,8)")
    p.add_argument("--temperatures", type=float_list, default=None, metavar="T[,T...]",
                   help="temperatures (default 0,0.8; 0 = greedy)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per setting (default 3; median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all available cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling, random weights and prompts (default 0)")
    p.add_argument("--random-prompt-len", type=int, default=32, help="prompt length with --random (default 32)")
    p.add_argument("--out", default=None, help=f"JSON file to write (default {DEFAULT_OUT}; --quick: {QUICK_OUT})")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="also save tokens/pass and speedup against draft length as a PNG (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p.parse_args(argv)


def config_from_args(args) -> SpecBenchConfig:
    cfg = quick_config() if args.quick else SpecBenchConfig()
    changes: Dict[str, Any] = {"seed": args.seed, "random_prompt_len": args.random_prompt_len}
    if args.no_adaptive:
        changes["adaptive"] = False
    if args.no_prompt_lookup:
        changes["prompt_lookup"] = False
    for name in ("new_tokens", "draft_lengths", "temperatures", "repeats"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    if changes.get("new_tokens", 1) < 1 or changes.get("repeats", 1) < 1:
        raise SystemExit(f"--new-tokens and --repeats must be >= 1, got {args.new_tokens} and {args.repeats}")
    return dataclasses.replace(cfg, **changes)


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    cfg = config_from_args(args)
    set_threads(args.threads)
    target, draft, prompts, lookup_prompt = load_models(args)
    device = torch.device(args.device)
    target, draft = target.to(device), draft.to(device)
    prompts, lookup_prompt = [p.to(device) for p in prompts], lookup_prompt.to(device)
    prompts = [fit_prompt(p, target, draft, cfg.new_tokens) for p in prompts]
    lookup_prompt = fit_prompt(lookup_prompt, target, draft, cfg.new_tokens)
    result = run_spec_benchmark(target, draft, prompts, lookup_prompt, cfg, progress=not args.no_progress,
                                draft_mode=args.draft_mode, reference=args.reference)
    result["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    machine = machine_description()
    text = render(result, machine)
    out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    command = "python -m benchmarks.spec_decoding_benchmark " + " ".join(sys.argv[1:] if argv is None else argv)
    path = write_results(out, result, machine=machine, command=command, markdown=text)
    print(f"wrote {path}", file=sys.stderr)
    if args.plot:
        print(f"wrote {plot(result, args.plot)}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
