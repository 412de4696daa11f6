"""Sample text from a trained checkpoint, streaming tokens as they are produced.

Examples::

    python generate.py --prompt "ROMEO:"                  # out/ (its best/ checkpoint), KV cache on
    python generate.py --prompt "ROMEO:" --no-use-cache   # the cache-free reference, for comparison
    echo "To be, or not to be" | python generate.py       # the prompt from stdin (also: --prompt -)
    python generate.py --temperature 0 --max-new-tokens 50 --prompt "KING:"   # greedy
    python generate.py --cache static --num-samples 3 --seed 1
    python generate.py --checkpoint out-s2s --src "5 9 12 4"   # encoder-decoder: token ids in
    python generate.py --checkpoint out-add --src "123+45"      # the add task also takes digits
    python generate.py --speculative --draft-checkpoint out-draft --temperature 0 --prompt "KING:"
    python generate.py --speculative --draft-checkpoint out-draft --compile --dtype bfloat16 --temperature 0
    python generate.py --speculative --prompt-lookup --prompt "To be, or not to be"
    python generate.py --cache sinks --window 252 --max-new-tokens 2000      # stream past the context
    python generate.py --cache quantized --kv-bits 4
    python generate.py --gpt2 ckpts/gpt2 --prompt-ids "464 3616 286 1204 318"   # Hugging Face GPT-2 folder
    python generate.py --model ckpts/Qwen3-0.6B --prompt "Hello" --chat      # Llama/Mistral/Qwen folder, text in and out

The text goes to stdout as it is generated; the speed (tokens/s) and the memory of the KV
cache (``cache.memory_bytes()``) go to stderr, so ``python generate.py > sample.txt`` saves
only the text.

``--checkpoint`` accepts a run directory written by ``train.py`` (its ``best/`` is loaded) or a
checkpoint directory itself (e.g. ``out/last``).  Checkpoints are safetensors + JSON: loading
one never unpickles anything.

Without ``--prompt`` (and with a terminal on stdin) the sample starts at a speaker heading
(``MACBETH:``) or a scene heading drawn, by ``--seed``, from the held-out text of the run that
trained the checkpoint (named in its ``metrics.json``), so it begins where a speech or a scene
begins, not mid-word.  If that text cannot be read, generation starts from the end-of-document
token (the model begins a document of its own) and stderr says why.  When the prompt is read
from stdin (a pipe, or ``--prompt -``), stderr says so: a pipe left open waits for its end.

Encoder-decoder checkpoints (``train.py --model encoder-decoder``) take ``--src``: the source
symbols as space-separated token ids.  Ids 0, 1, 2 are PAD, BOS, EOS; symbols are 3 and up
(below the model's vocab size, 16 by default).  For ``--task add`` models, ``--src`` may also be
written as digits, ``"123+45"``.  Decoding is greedy unless ``--temperature`` is given.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import List, Optional

import torch

from transformer import training as T
from transformer.checkpoint import CheckpointError, load_model
from transformer.engine.server import add_server_arguments, run_server
from transformer.data import EOS_ID, FIRST_SYMBOL, PLUS_ID, load_corpus, split_documents
from transformer.generation import CACHE_IMPLEMENTATIONS, EXACT_CACHES, LONG_CONTEXT_CACHES
from transformer.gpt2 import InsecureTorchError, load_gpt2, load_gpt2_tokenizer, parse_prompt_ids
from transformer.hf_models import load_pretrained
from transformer.detokenizer import IncrementalDetokenizer
from transformer.hf_tokenizer import HFTokenizer, load_hf_tokenizer
from transformer.sampling import SamplingSettings, sampling_value_problem
from spec_decoding import ModelDrafter, PromptLookupDrafter, format_stats, speculative_generate

DEFAULT_CHECKPOINT = "out"


# ---- flag values: checked by argparse, so a bad one is a one-line error naming the flag ----------

def int_at_least(low: int, note: str = ""):
    """An argparse ``type``: an integer ``>= low`` (``note`` explains a special value, e.g. "0 = off")."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}{note}, got {text!r}")
        return value
    return parse


def sampling_value(name: str, note: str = ""):
    """An argparse ``type``: a number obeying the rule of sampling setting ``name`` (the one rule
    of :data:`transformer.sampling.SAMPLING_RULES`, worded for a flag; ``note`` explains a special value)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")  # breaks every rule: the error below says what was expected
        expected = sampling_value_problem(name, value)
        if expected is not None:
            raise argparse.ArgumentTypeError(f"expected {expected}{note}, got {text!r}")
        return value
    parse.__name__ = f"{name}_value"  # argparse names the type in some messages
    return parse


temperature_value = sampling_value("temperature")
top_p_value = sampling_value("top_p", " (1 = off)")


def seed_value(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2 ** 64:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 and below 2**64, got {text!r}")
    return value


def device_value(text: str) -> str:
    """``auto``, or a device this machine has: ``cpu``, ``cuda``, ``cuda:N``, ``mps``."""
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r} is not available: this torch sees no CUDA GPU; use "
                                             f"--device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r} is not available: this machine has "
                                             f"{torch.cuda.device_count()} CUDA device(s), cuda:0 and up")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise argparse.ArgumentTypeError(f"{text!r} is not available: this torch has no Apple MPS backend; use "
                                             f"--device cpu (or auto)")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: generate.py runs on auto, cpu, cuda, cuda:N or mps")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="generate.py", description=__doc__.split("\n\n")[0],
                                epilog="Sampling order: temperature, then top-k, then top-p.  --temperature 0 is "
                                       "greedy (argmax).  See the module docstring for the encoder-decoder --src.")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help="run directory from train.py (loads its best/) or a checkpoint directory [default: out]")
    p.add_argument("--prompt", default=None,
                   help="text to continue; - reads it from stdin [default: stdin if it is not a terminal, else a "
                        "speaker or scene heading drawn by --seed from the run's held-out text]")
    p.add_argument("--src", default=None,
                   help="encoder-decoder models only: source token ids, e.g. \"5 9 12 4\" (symbols are ids >= 3), "
                        "or digits like \"123+45\" for the add task")
    p.add_argument("--max-new-tokens", type=int_at_least(0), default=None,
                   help="tokens to generate per sample [default: 200; encoder-decoder: up to max_seq_len - 1, "
                        "stopping at EOS]")
    p.add_argument("--temperature", type=temperature_value, default=None,
                   help="<1 sharper, >1 flatter, 0 = greedy [default: 0.8; 0 for encoder-decoder]")
    p.add_argument("--top-k", type=int_at_least(0, " (0 = off)"), default=200,
                   help="sample among the k most likely tokens (0 = off) [default: 200]")
    p.add_argument("--top-p", type=top_p_value, default=0.95,
                   help="then keep the smallest set of tokens with this much probability (1 = off) [default: 0.95]")
    p.add_argument("--seed", type=seed_value, default=None, help="seed for reproducible sampling [default: random]")
    p.add_argument("--num-samples", type=int_at_least(1), default=1, help="independent samples to draw [default: 1]")
    p.add_argument("--use-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="decode with a KV cache (--no-use-cache reruns the whole prefix every step: the "
                        "reference) [default: on]")
    p.add_argument("--cache", choices=CACHE_IMPLEMENTATIONS, default="dynamic",
                   help="dynamic grows as tokens arrive; static preallocates prompt + max-new-tokens; "
                        "sliding_window keeps the last --window tokens; sinks keeps --sink-tokens first tokens + "
                        "the last --window (StreamingLLM, for streams far past the training context); quantized "
                        "stores keys/values in --kv-bits bits [default: dynamic]")
    p.add_argument("--window", type=int_at_least(1), default=None,
                   help="tokens kept by sliding_window/sinks [default: sliding_window: the context; sinks: "
                        "context - sink tokens]")
    p.add_argument("--sink-tokens", type=int_at_least(0), default=4, help="first tokens kept forever by --cache sinks "
                                                              "[default: 4]")
    p.add_argument("--kv-bits", type=int, choices=(2, 4, 8), default=8,
                   help="bits per key/value for --cache quantized [default: 8]")
    p.add_argument("--kv-residual", type=int_at_least(0), default=32,
                   help="newest tokens kept exact by --cache quantized [default: 32]")
    spec = p.add_argument_group("speculative decoding (decoder-only checkpoints)")
    spec.add_argument("--speculative", action="store_true",
                      help="draft tokens with --draft-checkpoint (or --prompt-lookup) and verify them with the "
                           "model in one pass each round; same output distribution as plain sampling")
    spec.add_argument("--draft-checkpoint", default=None, metavar="DIR",
                      help="the draft model (same tokenizer), e.g. out-draft from train.py --preset draft")
    spec.add_argument("--prompt-lookup", action="store_true",
                      help="draft by copying the continuation of an earlier n-gram match in the context (no model)")
    spec.add_argument("--num-draft-tokens", type=int_at_least(1), default=4,
                      help="tokens drafted per round [default: 4]")
    spec.add_argument("--adaptive-draft", action="store_true",
                      help="grow the draft length after a fully accepted round, shrink it after a rejection")
    spec.add_argument("--compare", action="store_true",
                      help="then also time plain cached decoding of the same prompt and print the wall-clock "
                           "speedup of the last speculative sample (with --compile, use --num-samples 2: the "
                           "first sample pays for compiling the draft)")
    fast = p.add_argument_group("fast decoding (decoder-only)")
    fast.add_argument("--compile", action="store_true",
                      help="decode with transformer.FastDecoder: fixed-shape static cache, no host sync per token, "
                           "the step torch.compile'd (a CUDA graph on CUDA, bf16 there); the first run compiles "
                           "(~15-30 s); tokens print in bursts of 16.  With --speculative: the draft model's "
                           "steps (all k greedy drafts of a round in one compiled call; compiling it takes "
                           "~10 s for k=3, ~1 min for k=8 on a 2-core CPU, once per process)")
    fast.add_argument("--fast", action="store_true",
                      help="the same fixed-shape step without torch.compile (still a CUDA graph on CUDA)")
    hf = p.add_argument_group("pretrained models (Hugging Face folders)")
    hf.add_argument("--model", default=None, metavar="PATH",
                    help="load a Hugging Face folder of model_type llama, mistral, qwen2, qwen3 or gpt2 "
                         "(config.json + safetensors, tokenizer.json for text) instead of --checkpoint; no "
                         "`transformers` needed, nothing unpickled")
    hf.add_argument("--chat", action="store_true",
                    help="with --model: wrap --prompt as one user message in the folder's chat template")
    hf.add_argument("--gpt2", default=None, metavar="PATH",
                    help="load a Hugging Face GPT-2 folder (config.json + model.safetensors or pytorch_model.bin) "
                         "instead of --checkpoint; no `transformers` needed")
    hf.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="parameter dtype of the model (of the target with --speculative; the draft stays "
                         "float32) [default: float32]")
    hf.add_argument("--prompt-ids", default=None,
                    help="the prompt as token ids, e.g. \"464 2068 7586\" (for models without a tokenizer here)")
    p.add_argument("--device", type=device_value, default="cpu", help="cpu, cuda, mps or auto [default: cpu]")
    p.add_argument("--serve", action="store_true",
                   help="serve the checkpoint over an OpenAI-compatible HTTP API (continuous batching; "
                        "see docs/serving.md) instead of generating once")
    add_server_arguments(p)
    return p


def load_hf_folder(path: str, device, dtype: str):
    """``(model, tokenizer or None)`` of a Hugging Face folder for ``--model``: the model through
    :func:`transformer.hf_models.load_pretrained`, the tokenizer from ``tokenizer.json`` (or, for
    GPT-2, ``vocab.json`` + ``merges.txt``); ``None`` if the folder has neither (``--prompt-ids``
    still works).  The model stops at the tokenizer's main EOS id (a chat turn's end)."""
    model = load_pretrained(path, dtype=dtype, device=device)
    if (Path(path) / "tokenizer.json").is_file():
        tokenizer = load_hf_tokenizer(path)
        if tokenizer.eos_id is not None and tokenizer.eos_id < model.config.vocab_size:
            model.config.eos_token_id = tokenizer.eos_id
    else:
        tokenizer = load_gpt2_tokenizer(path) if model.config.mlp == "standard" else None
    return model, tokenizer


@contextmanager
def flag_named(flag: str, value: str):
    """Re-raise a loader's ``FileNotFoundError`` / ``ValueError`` with the flag and its value in
    front (``--model ckpts/x: no config.json in ...``), so the message says what the user typed."""
    try:
        yield
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{flag} {value}: {e}") from None
    except ValueError as e:
        raise ValueError(f"{flag} {value}: {e}") from None


def missing_hint(path: str) -> str:
    cmd = "python train.py" if path.rstrip("/") == DEFAULT_CHECKPOINT else f"python train.py --out-dir {path}"
    return f"create it with: {cmd}"


class TextStreamer:
    """``generate(..., streamer=...)`` callback that prints text as tokens arrive.

    Decoding token by token is wrong for multi-byte characters (a byte-level or byte-fallback
    piece may be half of an emoji) and for pieces that only make sense with their neighbours, so
    an :class:`~transformer.detokenizer.IncrementalDetokenizer` decodes a short window ending at
    the new token and prints what it added, holding back a trailing U+FFFD (an unfinished UTF-8
    character) until its other bytes arrive.  After any of ``stop_ids`` (a folder's EOS ids) it
    prints nothing more.  Cost: two decodes of a few tokens per token (not of the whole text).
    """

    def __init__(self, tokenizer, prompt_ids: List[int], out=None, stop_ids=()):
        self.tokenizer, self.out = tokenizer, out or sys.stdout
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stop_ids, self.stopped = set(stop_ids), False  # any of a folder's EOS ids ends the text

    def __call__(self, token: torch.Tensor) -> None:
        if self.stopped:
            return
        token_id = int(token[0])
        self.stopped = token_id in self.stop_ids
        self._write(self.detok.add([token_id]))

    def _write(self, piece: str) -> None:
        if piece:
            self.out.write(piece)
            self.out.flush()

    def end(self) -> str:
        """Print what was held back; return the whole text (prompt included)."""
        self._write(self.detok.finish())
        return self.tokenizer.decode(self.detok.ids)


def parse_src(text: str, task: Optional[str], vocab_size: int) -> List[int]:
    """``"5 9 12"`` -> ``[5, 9, 12, EOS]``; for the add task ``"123+45"`` -> digit ids, ``+``, EOS."""
    compact = text.replace(" ", "")
    if task == "add" and re.fullmatch(r"\d+\+\d+", compact):
        ids = [PLUS_ID if c == "+" else FIRST_SYMBOL + int(c) for c in compact]
    else:
        try:
            ids = [int(t) for t in re.split(r"[\s,]+", text.strip()) if t]
        except ValueError:
            raise ValueError(f"--src {text!r}: expected space-separated token ids such as \"5 9 12 4\""
                             + (" or digits such as \"123+45\"" if task == "add" else "")) from None
    bad = [i for i in ids if not FIRST_SYMBOL <= i < vocab_size]
    if not ids or bad:
        raise ValueError(f"--src {text!r}: symbols must be token ids in [{FIRST_SYMBOL}, {vocab_size}) "
                         f"(0-2 are PAD/BOS/EOS); got {bad or 'nothing'}")
    return ids + [EOS_ID]


def expected_answer(task: Optional[str], src: List[int]) -> Optional[List[int]]:
    """What the synthetic task's answer is (for display), or None for an unknown task."""
    s = src[:-1]
    if task == "copy":
        return s
    if task == "reverse":
        return s[::-1]
    if task == "sort":
        return sorted(s)
    if task == "add" and s.count(PLUS_ID) == 1:
        i = s.index(PLUS_ID)
        num = lambda ids: int("".join(str(t - FIRST_SYMBOL) for t in ids) or "0")
        return [FIRST_SYMBOL + int(c) for c in str(num(s[:i]) + num(s[i + 1:]))]
    return None


def format_bytes(n: int) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("bytes", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def compare_with_plain(model, input_ids, max_new: int, args, sampling, spec_out, spec_seconds: float) -> None:
    """``--compare``: time plain cached decoding of the same prompt (the default path: eager,
    ``--cache``) and print the speculative sample's wall-clock speedup over it to stderr; at
    temperature 0 also whether both gave the same tokens (they must, up to bfloat16 near-ties)."""
    t0 = time.perf_counter()
    plain = model.generate(input_ids, max_new, cache_implementation=args.cache, **sampling)
    seconds = time.perf_counter() - t0
    n_spec, n_plain = spec_out.shape[1] - input_ids.shape[1], plain.shape[1] - input_ids.shape[1]
    spec_rate, plain_rate = n_spec / max(spec_seconds, 1e-9), n_plain / max(seconds, 1e-9)
    same = ""
    if not sampling.get("do_sample"):
        same = "; same tokens: " + ("yes" if torch.equal(plain, spec_out) else "no" + (
            " (bfloat16 rounding: where the top two logits nearly tie, a 1-token and a k-token pass can "
            "pick differently; float32 gives the same tokens)" if next(model.parameters()).dtype != torch.float32 else ""))
    print(f"[plain cached decoding of the same prompt: {n_plain} tokens in {seconds:.2f}s = {plain_rate:.1f} "
          f"tokens/s; speculative decoding: {spec_rate / max(plain_rate, 1e-9):.2f}x faster{same}]",
          file=sys.stderr, flush=True)


def report(n_tokens: int, seconds: float, cache, args, stats=None) -> None:
    """Speed, cache mode and cache memory (and speculative statistics) to stderr."""
    mode = f"{args.cache} KV cache" if args.use_cache else "no cache (full recompute per token)"
    if (getattr(args, "compile", False) or getattr(args, "fast", False)) and stats is None:
        mode = "fast path, fixed-shape static cache" + (" (compiled)" if args.compile else "")
    mem = f", cache memory {format_bytes(cache.memory_bytes())}" if cache is not None else ""
    print(f"[{n_tokens} tokens in {seconds:.2f}s = {n_tokens / max(seconds, 1e-9):.1f} tokens/s; {mode}{mem}]",
          file=sys.stderr, flush=True)
    if stats is not None:
        print(format_stats(stats), file=sys.stderr, flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)  # flag values are checked here (one argparse line each)
    try:
        device = T.resolve_device(args.device)
        if args.model is not None and args.gpt2 is not None:
            raise ValueError(f"--model {args.model} and --gpt2 {args.gpt2}: give one folder")
        if args.chat and args.model is None:
            raise ValueError("--chat needs --model PATH (a Hugging Face folder with a chat template)")
        if args.chat and args.serve:
            raise ValueError("--chat with --serve: the server's /v1/completions takes the prompt text as it is sent "
                             "(render the chat template in the client); drop --chat")
        if args.chat and args.prompt_ids is not None:
            raise ValueError(f"--chat with --prompt-ids {args.prompt_ids!r}: --chat wraps a text --prompt in the chat "
                             f"template; token ids are used as they are (drop one of the two)")
        if args.prompt_ids is not None and args.prompt is not None:
            raise ValueError(f"--prompt {args.prompt!r} and --prompt-ids {args.prompt_ids!r}: give the prompt once, "
                             f"as text or as token ids")
        if args.model is not None:
            with flag_named("--model", args.model):  # the loaders name the file; the user typed the flag
                model, tokenizer = load_hf_folder(args.model, device, args.dtype)
            ckpt = SimpleNamespace(path=args.model, model_type="hf")
        elif args.gpt2 is not None:
            with flag_named("--gpt2", args.gpt2):
                model, tokenizer = load_gpt2(args.gpt2, device=device, dtype=args.dtype)
            ckpt = SimpleNamespace(path=args.gpt2, model_type="gpt2")
        else:
            model, tokenizer, ckpt = load_model(args.checkpoint, device=device,
                                                hint=missing_hint(args.checkpoint))
            model.to(getattr(torch, args.dtype))
        draft = load_draft(args, model, device)
        if args.compile or args.fast:
            if not args.use_cache:
                raise ValueError("--compile/--fast decode through their own static cache; they cannot be combined "
                                 "with --no-use-cache")
            if device.type == "cuda" and not args.speculative:
                model.to(torch.bfloat16)  # bf16 on GPU: half the bytes to stream per token
    except (CheckpointError, FileNotFoundError, ValueError, InsecureTorchError) as e:  # GPT2FormatError: a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    seq2seq = ckpt.model_type == "encoder_decoder"
    if args.serve:
        if seq2seq:
            print("error: --serve serves decoder-only checkpoints", file=sys.stderr)
            return 2
        run_server(model, tokenizer, args)
        return 0
    # The flags on the one settings object (transformer.sampling).  The defaults are the CLI's own:
    # --temperature 0.8 (0 for the encoder-decoder tasks, which have one right answer), --top-k 200,
    # --top-p 0.95; --top-k 0 and --top-p 1 mean "off" (None).  do_sample follows the temperature.
    settings = SamplingSettings(temperature=args.temperature if args.temperature is not None else
                                (0.0 if seq2seq else 0.8), top_k=args.top_k or None,
                                top_p=args.top_p if args.top_p < 1 else None,
                                seed=args.seed if args.seed is not None else torch.seed())
    sampling = settings.generate_kwargs()  # do_sample, temperature, top_k, top_p for every path below
    if getattr(tokenizer, "eos_ids", None):  # a Hugging Face folder: any of its EOS ids ends the text
        sampling["eos_token_id"] = tokenizer.eos_ids
    seed = settings.seed
    generator = settings.make_generator(device)
    print(f"[loaded {ckpt.path} ({ckpt.model_type}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"parameters) on {device}]", file=sys.stderr)
    problem = check_cache_flags(args, model.config)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2

    try:
        if seq2seq:
            if args.speculative or args.cache in LONG_CONTEXT_CACHES:
                print("error: --speculative and --cache sliding_window/sinks/quantized are for decoder-only "
                      "checkpoints", file=sys.stderr)
                return 2
            return generate_seq2seq(model, args, sampling, generator, device)
        if args.prompt_ids is not None or (tokenizer is None and ckpt.model_type in ("gpt2", "hf")):
            return generate_ids(model, tokenizer, args, sampling, generator, device, draft)
        if tokenizer is None:
            print(f"error: checkpoint {ckpt.path} holds no tokenizer (tokenizer.model); it was not written by "
                  f"train.py", file=sys.stderr)
            return 1
        return generate_text(model, tokenizer, args, sampling, generator, device, draft,
                             seed=seed, run_dirs=() if ckpt.model_type in ("gpt2", "hf") else run_dirs_of(ckpt.path))
    except ValueError as e:  # bad sampling values, a prompt too long for learned positions...
        print(f"error: {e}", file=sys.stderr)
        return 2


def check_cache_flags(args, config) -> Optional[str]:
    """What is wrong with the cache flags for this model, in the flags' own terms (or ``None``)."""
    if args.cache == "sinks" and args.window is None:
        context = config.sliding_window or config.max_seq_len
        if args.sink_tokens >= context:
            return (f"--cache sinks --sink-tokens {args.sink_tokens}: without --window the window is the model's "
                    f"context ({context} tokens) minus the sink tokens, which leaves no room; use --sink-tokens "
                    f"below {context}, or give --window")
    return None


def cache_options(args) -> dict:
    """``--window/--sink-tokens/--kv-bits/--kv-residual`` as ``model.new_cache(kind, ..., **options)``."""
    if args.cache == "sliding_window":
        return {} if args.window is None else {"window": args.window}
    if args.cache == "sinks":
        return {"num_sink_tokens": args.sink_tokens, **({} if args.window is None else {"window": args.window})}
    if args.cache == "quantized":
        return {"nbits": args.kv_bits, "residual_length": args.kv_residual}
    return {}


def load_draft(args, model, device):
    """The drafter for ``--speculative``: a draft model from ``--draft-checkpoint`` or prompt lookup."""
    if not args.speculative:
        if args.draft_checkpoint or args.prompt_lookup or args.compare:
            raise ValueError("--draft-checkpoint / --prompt-lookup / --compare need --speculative")
        return None
    if not args.use_cache:
        raise ValueError("--speculative decodes through the KV caches; it cannot be combined with --no-use-cache")
    if args.cache not in EXACT_CACHES:
        raise ValueError(f"--speculative rolls caches back with rollback(); use --cache dynamic or static, not {args.cache}")
    if args.prompt_lookup == bool(args.draft_checkpoint):
        raise ValueError("--speculative needs exactly one drafter: --draft-checkpoint DIR or --prompt-lookup")
    if args.prompt_lookup:
        if args.compile or args.fast:
            raise ValueError("--compile/--fast with --speculative run the draft model's steps on the fast path; "
                             "--prompt-lookup has no draft model (drop --compile/--fast, or use --draft-checkpoint)")
        return PromptLookupDrafter()
    draft, _, _ = load_model(args.draft_checkpoint, device=device, hint=missing_hint(args.draft_checkpoint))
    if draft.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"the draft's vocab_size={draft.config.vocab_size} differs from the model's "
                         f"vocab_size={model.config.vocab_size}: train the draft with --tokenizer of the target")
    # --compile / --fast with --speculative: the draft's steps take the fast path (the target's
    # verification pass has a different length every round and stays eager)
    return ModelDrafter(draft, fast=args.fast, compile=args.compile)


def run_generation(model, input_ids, max_new, args, sampling, generator, streamer, draft):
    """One sample: plain ``generate`` or ``speculative_generate``; returns ``(tokens, cache, stats)``."""
    if draft is not None:
        out, stats = speculative_generate(model, draft, input_ids, max_new, num_draft_tokens=args.num_draft_tokens,
                                          cache_implementation=args.cache, generator=generator, streamer=streamer,
                                          adaptive=args.adaptive_draft, **sampling)
        return out, None, stats
    if args.compile or args.fast:
        out = model.generate(input_ids, max_new, compile=args.compile, fast=args.fast, cache_implementation=args.cache,
                             generator=generator, streamer=streamer, **sampling)
        return out, None, None
    cache = (model.new_cache(args.cache, 1, input_ids.shape[1] + max_new, **cache_options(args))
             if args.use_cache else None)
    impl = cache if cache is not None else args.cache  # an empty Cache is falsy (len 0): test for None
    out = model.generate(input_ids, max_new, use_cache=args.use_cache, cache_implementation=impl,
                         generator=generator, streamer=streamer, **sampling)
    return out, cache, None


def generate_ids(model, tokenizer, args, sampling, generator, device, draft=None) -> int:
    """--prompt-ids (or a GPT-2 folder without a readable tokenizer): token ids in, token ids out."""
    if args.prompt_ids is None:
        if args.model is not None:
            print(f"error: --model {args.model}: no tokenizer.json in that folder, so a text prompt cannot be "
                  f"encoded; expected the Hugging Face `tokenizers` file beside config.json, or give the prompt as "
                  f"token ids: --prompt-ids \"464 2068 7586\"", file=sys.stderr)
        else:
            print("error: no tokenizer could be read from this GPT-2 folder (install `tokenizers`, or add "
                  "tokenizer.json / vocab.json + merges.txt); give the prompt as --prompt-ids \"464 2068 7586\"",
                  file=sys.stderr)
        return 2
    prompt_ids = parse_prompt_ids(args.prompt_ids, model.config.vocab_size)
    if len(prompt_ids) > model.config.max_seq_len:
        print(f"error: --prompt-ids holds {len(prompt_ids)} ids; this model's context is max_seq_len="
              f"{model.config.max_seq_len}", file=sys.stderr)
        return 2
    max_new = 200 if args.max_new_tokens is None else args.max_new_tokens
    max_new = min(max_new, model.config.max_seq_len - len(prompt_ids))
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    for _ in range(args.num_samples):
        t0 = time.perf_counter()
        out, cache, stats = run_generation(model, input_ids, max_new, args, sampling, generator,
                                           lambda t: print(int(t[0]), end=" ", flush=True), draft)
        seconds = time.perf_counter() - t0
        new = out[0, len(prompt_ids):].tolist()
        print()
        if tokenizer is not None and max(new + prompt_ids) < tokenizer.vocab_size:
            print(tokenizer.decode(prompt_ids + new))
        report(len(new), seconds, cache, args, stats)
    if args.compare and draft is not None:
        compare_with_plain(model, input_ids, max_new, args, sampling, out, seconds)
    return 0


def run_dirs_of(checkpoint_path) -> List[Path]:
    """Where a run's ``metrics.json`` may be: the checkpoint directory (``out/best``) and its run directory."""
    path = Path(checkpoint_path)
    return [path, path.parent]


#: A line that opens a speech (``MACBETH:``, ``First Witch:``) or an act or scene
#: (``SCENE II. A camp near Forres.``), as the plays are written (see ``strip_play_markup``).
HEADING = re.compile(r"(?:ACT|SCENE) [IVXLC\d]+\b.*|[A-Z][A-Za-z'.-]*(?: [A-Z][A-Za-z'.-]*){0,3}:")


def heading_lines(text: str) -> List[str]:
    """The lines of ``text`` that match :data:`HEADING` and follow a blank line (or open the text)."""
    found, after_blank = [], True
    for line in text.splitlines():
        line = line.rstrip()
        if after_blank and HEADING.fullmatch(line):
            found.append(line)
        after_blank = not line.strip()
    return found


def default_prompt(run_dirs, seed: int):
    """``(prompt, note)``: a heading line drawn with ``random.Random(seed)`` from the held-out text of
    the run that trained the checkpoint (its ``metrics.json`` names the corpus, the split and its
    seed), so a sample without a prompt starts where a speech or scene starts; ``(None, why not)``
    if that text cannot be read or holds no heading."""
    metrics = next((Path(d) / "metrics.json" for d in run_dirs if (Path(d) / "metrics.json").is_file()), None)
    if metrics is None:
        return None, "no metrics.json beside the checkpoint names the text it was trained on"
    try:
        cfg = json.loads(metrics.read_text(encoding="utf-8"))["train_config"]
        train, held_out = split_documents(load_corpus(cfg.get("data")), cfg.get("val_fraction", 0.1),
                                          seed=cfg.get("seed", 1337))
    except (OSError, ValueError, KeyError, TypeError, ModuleNotFoundError) as e:
        return None, f"the training text named in {metrics} could not be read ({type(e).__name__}: {e})"
    headings = [h for doc in held_out for h in heading_lines(doc.text)]
    where = "held-out"
    if not headings:
        headings, where = [h for doc in train for h in heading_lines(doc.text)], "training"
    if not headings:
        return None, f"the text named in {metrics} has no speaker or scene headings"
    heading = random.Random(seed).choice(headings)
    return heading + "\n", (f"[no prompt: starting at {heading!r}, a heading drawn from the {where} text by the "
                            f"seed; --prompt TEXT gives your own]")


def read_prompt(args) -> Optional[str]:
    """``--prompt``, or stdin for ``--prompt -`` or when stdin is not a terminal (saying so on stderr)."""
    if args.prompt == "-" or (args.prompt is None and sys.stdin is not None and not sys.stdin.isatty()):
        print("[reading the prompt from stdin until it ends (Ctrl-D at a terminal); --prompt TEXT gives it on the "
              "command line]", file=sys.stderr, flush=True)
        return sys.stdin.read()
    return args.prompt


def generate_text(model, tokenizer, args, sampling, generator, device, draft=None, seed: int = 0,
                  run_dirs=()) -> int:
    """Text in, text out: encode the prompt (through the chat template with ``--chat``), print it,
    then stream the generated text as tokens arrive (:class:`TextStreamer`), ``--num-samples``
    times; the speed goes to stderr.  Returns the exit status (2 for a prompt this model cannot
    take).  Cost: one prefill of the prompt, then one cached step per new token."""
    config = model.config
    prompt = read_prompt(args)
    if not prompt:
        prompt, note = default_prompt(run_dirs, seed) if run_dirs else (None, "no run directory to draw from")
        if prompt is None:
            note = (f"[no prompt: starting from the end-of-document token ({note}); --prompt TEXT gives the "
                    f"start]")
        print(note, file=sys.stderr)
    if args.chat:
        if not isinstance(tokenizer, HFTokenizer):
            print(f"error: --chat needs the folder's tokenizer.json and chat template; --model {args.model} has no "
                  f"tokenizer.json", file=sys.stderr)
            return 2
        prompt_ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": prompt or ""}]),
                                      add_special_tokens=False)  # the template writes BOS itself
    else:
        prompt_ids = tokenizer.encode(prompt or "")
    if not prompt_ids:
        if tokenizer.eos_id is None:
            print("error: --prompt is empty and this tokenizer has no BOS or EOS token to start from; expected "
                  "--prompt TEXT", file=sys.stderr)
            return 2
        prompt_ids = [tokenizer.eos_id]  # "a document just ended": the model starts a new one
    bad = sorted({i for i in prompt_ids if not 0 <= i < config.vocab_size})
    if bad:
        print(f"error: the prompt encodes to token ids {bad[:5]} outside [0, vocab_size={config.vocab_size}) of "
              f"the model: its tokenizer does not belong to this checkpoint", file=sys.stderr)
        return 2
    if len(prompt_ids) > config.max_seq_len:
        print(f"[prompt has {len(prompt_ids)} tokens; keeping the last max_seq_len={config.max_seq_len}]",
              file=sys.stderr)
        prompt_ids = prompt_ids[-config.max_seq_len:]
    max_new = 200 if args.max_new_tokens is None else args.max_new_tokens
    if len(prompt_ids) + max_new > config.max_seq_len:
        if config.pos_encoding == "learned":
            max_new = config.max_seq_len - len(prompt_ids)
            print(f"[learned positions stop at max_seq_len={config.max_seq_len}: generating {max_new} tokens]",
                  file=sys.stderr)
        elif args.cache not in ("sliding_window", "sinks"):
            print(f"[note: beyond {config.max_seq_len} tokens (the training context) RoPE models drift; "
                  f"--cache sinks keeps them fluent]", file=sys.stderr)
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            sys.stdout.write(f"{'' if i == 0 else chr(10)}---------- sample {i + 1} ----------\n")
        streamer = TextStreamer(tokenizer, prompt_ids, stop_ids=getattr(tokenizer, "eos_ids", ()))
        sys.stdout.write(tokenizer.decode(prompt_ids))
        sys.stdout.flush()
        t0 = time.perf_counter()
        out, cache, stats = run_generation(model, input_ids, max_new, args, sampling, generator, streamer, draft)
        seconds = time.perf_counter() - t0
        text = streamer.end()
        if not text.endswith("\n"):
            sys.stdout.write("\n")
        sys.stdout.flush()
        report(out.shape[1] - len(prompt_ids), seconds, cache, args, stats)
    if args.compare and draft is not None:
        compare_with_plain(model, input_ids, max_new, args, sampling, out, seconds)
    return 0


def generate_seq2seq(model, args, sampling, generator, device) -> int:
    config = model.config
    task = config.extra.get("task")
    if args.src is None:
        print(f"error: this is an encoder-decoder checkpoint (task {task!r}); give the source with --src, "
              f"e.g. --src \"5 9 12 4\"" + (" or --src \"123+45\"" if task == "add" else ""), file=sys.stderr)
        return 2
    src_ids = parse_src(args.src, task, config.src_vocab_size)
    src = torch.tensor([src_ids], dtype=torch.long, device=device)
    max_new = config.max_seq_len - 1 if args.max_new_tokens is None else args.max_new_tokens
    max_new = min(max_new, config.max_seq_len - 1) if config.pos_encoding == "learned" else max_new
    want = expected_answer(task, src_ids)
    print(f"[task {task}; source ids {src_ids} (EOS appended)"
          + (f"; expected answer {' '.join(map(str, want))}" if want is not None else "") + "]", file=sys.stderr)
    for i in range(args.num_samples):
        cache = model.new_cache(args.cache, 1, 1 + max_new, src_len=src.shape[1]) if args.use_cache else None
        produced: List[int] = []

        def stream(token: torch.Tensor) -> None:
            t = int(token[0])
            if t != EOS_ID:
                produced.append(t)
                sys.stdout.write(f"{t} ")
                sys.stdout.flush()

        t0 = time.perf_counter()
        impl = cache if cache is not None else args.cache
        out = model.generate(src, max_new, use_cache=args.use_cache, cache_implementation=impl,
                             generator=generator, streamer=stream, eos_token_id=EOS_ID, **sampling)
        seconds = time.perf_counter() - t0
        if task == "add" and all(FIRST_SYMBOL <= t < FIRST_SYMBOL + 10 for t in produced) and produced:
            sys.stdout.write("= " + "".join(str(t - FIRST_SYMBOL) for t in produced))
        sys.stdout.write("\n")
        sys.stdout.flush()
        if want is not None:
            print(f"[{'correct' if produced == want else 'WRONG'}]", file=sys.stderr)
        report(out.shape[1] - 1, seconds, cache, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
