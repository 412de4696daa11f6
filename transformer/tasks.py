"""What a training run learns, behind one interface: a language model, or seq2seq on a toy task.

``train.py``'s loop is the same for every model: build it, then repeat "draw a batch, take the
loss, step the optimiser", evaluating and saving every few steps.  What differs is *what* it
learns from and *how it is scored*, and a :class:`Task` answers exactly those questions, so the
loop never asks which kind of model it trains.  The hooks, in the order the loop calls them::

    hook               LanguageModelTask (--model decoder)       Seq2SeqTask (--model encoder-decoder)
    prepare            corpus, tokenizer, token ids              -- (problems are generated)
    model_overrides    vocabulary and ids of the tokenizer       the task's ids, its longest problem
    check_model        a window fits in the model's positions    --
    prepare_loss       the frozen --teacher, if any              --
    make_data          random windows (+ the teacher's text)     a generator; the held-out problems
    data_state         where the window stream stands            the generator's state
    train_loss         cross-entropy, or distillation            teacher-forced cross-entropy
    evaluate           validation loss                           loss and exact match
    describe           bits per character                        exact match
    final_evaluation   loss of best/ on the whole split          exact match of best/
    files_to_save      the tokenizer, in every checkpoint        --

:data:`TASKS` maps ``--model`` to its task.  The order matters for reproducibility: the loop
seeds the global RNG before it builds the model, and again (``seed + rank``: the dropout masks)
right before :meth:`~Task.make_data`; batches come from generators of their own, whose state
:meth:`~Task.data_state` hands to the checkpoint, so a resumed run draws what an uninterrupted
one would have.
"""

from __future__ import annotations

import abc
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from .config import ModelConfig
from .data import (BOS_ID, EOS_ID, PAD_ID, TokenDataset, bits_per_char, count_chars, load_corpus,
                   make_seq2seq_batch, split_documents, tokenize_documents)
from .distill import distill_loss, load_teacher, teacher_text_batches
from .distributed import Distributed, barrier
from .encoder_decoder import EncoderDecoderTransformer
from .losses import evaluate_lm, evaluate_seq2seq, lm_loss, make_eval_problems, seq2seq_loss
from .machine import autocast
from .model import DecoderOnlyTransformer
from .run_dir import RunFiles, writing
from .tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from .train_config import SetupError, TrainConfig


class Task(abc.ABC):
    """One kind of training run: its data, its loss, its scores.

    Args:
        tcfg: the run's settings.
        ctx: which data-parallel rank this process is (rank 0 alone writes and prints).
        device, dtype: where the model lives and the autocast dtype of its forward passes.
        log: prints one line (on rank 0; ``train.py`` passes its tqdm-safe printer).
        show_progress: whether long preparations may show a progress bar.
    """

    #: ``--model`` value of this task, the preset it defaults to, and the model it trains.
    kind: str
    default_preset: str
    model_class: type

    def __init__(self, tcfg: TrainConfig, ctx: Distributed, device: torch.device, dtype: torch.dtype,
                 log: Callable[[str], None] = print, show_progress: bool = True):
        self.tcfg, self.ctx, self.device, self.dtype = tcfg, ctx, device, dtype
        self.log, self.show_progress = log, show_progress

    def prepare(self, files: RunFiles, resume_dir: Optional[Path]) -> None:
        """Get the data that exists before the model (``resume_dir``: the checkpoint resumed from)."""

    @abc.abstractmethod
    def model_overrides(self, model_over: Dict[str, Any], given: Dict[str, Any]) -> Dict[str, Any]:
        """``model_over`` (ModelConfig fields) plus those the data decides; ``given`` holds the
        flags typed on the command line, which a task must not override."""

    def check_model(self, mcfg: ModelConfig) -> None:
        """Raise :class:`~transformer.train_config.SetupError` if a new model cannot train on the data."""

    def prepare_loss(self, mcfg: ModelConfig) -> None:
        """Load what the loss needs besides the model (before the optimiser; may raise ``SetupError``)."""

    @abc.abstractmethod
    def make_data(self, mcfg: ModelConfig) -> None:
        """Build the training batch stream (seeded ``seed + rank``) and any fixed held-out data."""

    @abc.abstractmethod
    def data_state(self) -> Dict[str, Any]:
        """Where the batch stream stands (saved in ``last/`` per rank, for an exact ``--resume``)."""

    @abc.abstractmethod
    def load_data_state(self, state: Dict[str, Any]) -> None:
        """Put the batch stream back where :meth:`data_state` said it was."""

    @abc.abstractmethod
    def train_loss(self, model: nn.Module) -> Tuple[torch.Tensor, int]:
        """Draw the next batch and return ``(scalar loss to back-propagate, tokens trained on by all
        ranks)``; the forward pass runs under autocast."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module) -> Dict[str, float]:
        """The periodic validation numbers: ``{"val_loss": nats/token, ...}`` (lower is better)."""

    @abc.abstractmethod
    def describe(self, metrics: Dict[str, float]) -> Tuple[Dict[str, Any], str]:
        """``(more fields for log.jsonl, more text for the log line)`` about :meth:`evaluate`'s numbers."""

    @abc.abstractmethod
    def final_evaluation(self, model: nn.Module) -> Dict[str, Any]:
        """Score the best model thoroughly, log one line, and return the fields of ``metrics.json``."""

    def files_to_save(self) -> Optional[Dict[str, Path]]:
        """``{name: path}`` of files every checkpoint carries (``None``: the weights are enough)."""
        return None


class LanguageModelTask(Task):
    """Next-token prediction on text: a decoder-only model, scored in bits per character.

    The corpus (``--data``) is split by whole documents; a tokenizer is trained on the training
    part (or reused); batches are random ``block_size`` windows of the token stream, optionally
    mixed with text the ``--teacher`` writes, and the loss is the cross-entropy or, with a
    teacher, the distillation loss.  Cost per step: one forward and backward pass over
    ``batch_size x block_size`` tokens (plus the teacher's forward pass when distilling).
    """

    kind, default_preset, model_class = "decoder", "cpu", DecoderOnlyTransformer
    teacher: Optional[nn.Module] = None

    def prepare(self, files: RunFiles, resume_dir: Optional[Path]) -> None:
        """Corpus -> tokenizer, token ids of both splits, and the validation characters.

        Rank 0 trains and saves the tokenizer; the other ranks wait, then load the saved file, so
        every rank tokenizes with exactly the same model.
        """
        tcfg, ctx = self.tcfg, self.ctx
        docs = load_corpus(tcfg.data)
        train_docs, val_docs = split_documents(docs, tcfg.val_fraction, seed=tcfg.seed)
        self.log(f"corpus: {len(docs)} documents, {count_chars(train_docs):,} train / {count_chars(val_docs):,} "
                 f"val characters; validation documents: {', '.join(d.name for d in val_docs[:6])}"
                 f"{' ...' if len(val_docs) > 6 else ''}")
        source = resume_dir or (Path(tcfg.tokenizer) if tcfg.tokenizer else None)
        if ctx.is_main:
            with writing(files.root):
                files.root.mkdir(parents=True, exist_ok=True)
            if source is not None:
                tok = load_tokenizer(source)
                self.log(f"tokenizer: reused {tok!r} from {source}")
            elif tcfg.tokenizer_type == "bytes":
                tok = ByteTokenizer()
            else:
                t0 = time.time()
                tok = Tokenizer.train(train_docs, vocab_size=tcfg.vocab_size, model_type=tcfg.tokenizer_type)
                self.log(f"tokenizer: trained {tcfg.tokenizer_type} with vocab {tok.vocab_size} on the training "
                         f"split in {time.time() - t0:.1f}s -> {files.root}")
            with writing(files.root / tok.FILENAME):
                files.save_tokenizer(tok, source)
        barrier(ctx)
        self.tok = load_tokenizer(files.root)
        self.tok_file = files.root / self.tok.FILENAME
        self.train_ids = tokenize_documents(train_docs, self.tok)
        self.val_ids = tokenize_documents(val_docs, self.tok)
        self.val_chars = count_chars(val_docs)
        self.log(f"tokens: {len(self.train_ids):,} train, {len(self.val_ids):,} val "
                 f"({self.val_chars / max(1, len(self.val_ids) - 1):.2f} characters per validation token)")

    def model_overrides(self, model_over: Dict[str, Any], given: Dict[str, Any]) -> Dict[str, Any]:
        tok = self.tok
        model_over = dict(model_over, vocab_size=tok.vocab_size, pad_token_id=tok.pad_id, bos_token_id=tok.bos_id,
                          eos_token_id=tok.eos_id)
        if "max_seq_len" not in given:  # the model must see at least a whole training window
            model_over["max_seq_len"] = max(model_over.get("max_seq_len", 0), self.tcfg.block_size)
        return model_over

    def check_model(self, mcfg: ModelConfig) -> None:
        if self.tcfg.block_size > mcfg.max_seq_len:
            raise SetupError(f"--block-size {self.tcfg.block_size} exceeds --max-seq-len {mcfg.max_seq_len}")

    def prepare_loss(self, mcfg: ModelConfig) -> None:
        """Load the ``--teacher`` to distil from, if there is one."""
        tcfg = self.tcfg
        if not tcfg.teacher:
            return
        self.teacher = load_teacher(tcfg.teacher, mcfg.vocab_size, tcfg.block_size, self.device)
        self.log(f"distilling from {tcfg.teacher} ({sum(p.numel() for p in self.teacher.parameters()) / 1e6:.2f}M "
                 f"parameters), loss = {1 - tcfg.distill_weight:g} * CE + {tcfg.distill_weight:g} * KL")

    def make_data(self, mcfg: ModelConfig) -> None:
        tcfg, rank = self.tcfg, self.ctx.rank
        self.data = TokenDataset(self.train_ids, tcfg.block_size, tcfg.batch_size, seed=tcfg.seed + rank,
                                 device=self.device)
        if self.teacher is not None and tcfg.teacher_samples:
            self.data = teacher_text_batches(self.teacher, self.train_ids, self.data, tcfg, rank=rank,
                                             device=self.device, log=self.log, show_progress=self.show_progress)

    def data_state(self) -> Dict[str, Any]:
        return self.data.state_dict()

    def load_data_state(self, state: Dict[str, Any]) -> None:
        self.data.load_state_dict(state)

    def train_loss(self, model: nn.Module) -> Tuple[torch.Tensor, int]:
        tcfg = self.tcfg
        x, y = self.data.next_batch()
        with autocast(self.device, self.dtype):
            loss = (lm_loss(model, x, y) if self.teacher is None
                    else distill_loss(model, self.teacher, x, y, tcfg.distill_weight))
        return loss, tcfg.batch_size * tcfg.block_size * self.ctx.world_size

    def _val_loss(self, model: nn.Module, max_batches: Optional[int]) -> float:
        tcfg, ctx = self.tcfg, self.ctx
        return evaluate_lm(model, self.val_ids, tcfg.block_size, tcfg.batch_size, max_batches, self.device,
                           self.dtype, ctx.rank, ctx.world_size)

    def evaluate(self, model: nn.Module) -> Dict[str, float]:
        return {"val_loss": self._val_loss(model, self.tcfg.eval_batches or None)}

    def describe(self, metrics: Dict[str, float]) -> Tuple[Dict[str, Any], str]:
        bpc = bits_per_char(metrics["val_loss"], self.val_chars / (len(self.val_ids) - 1))
        subset = "" if not self.tcfg.eval_batches else f" (first {self.tcfg.eval_batches} batches; bpc estimated)"
        return {"val_bits_per_char": bpc}, f" = {bpc:.3f} bits/char{subset}"

    def final_evaluation(self, model: nn.Module) -> Dict[str, Any]:
        t0 = time.time()
        loss = self._val_loss(model, None)
        cpt = self.val_chars / (len(self.val_ids) - 1)
        result = dict(val_loss=loss, val_bits_per_char=bits_per_char(loss, cpt), val_chars_per_token=cpt,
                      val_tokens=len(self.val_ids), val_chars=self.val_chars, tokenizer=repr(self.tok),
                      eval_time_s=time.time() - t0)
        self.log(f"final: best/ on the whole validation split ({len(self.val_ids):,} tokens, {self.val_chars:,} "
                 f"characters): loss {loss:.4f} nats/token = {result['val_bits_per_char']:.3f} bits/char")
        return result

    def files_to_save(self) -> Optional[Dict[str, Path]]:
        return {self.tok_file.name: self.tok_file}


class Seq2SeqTask(Task):
    """A synthetic sequence-to-sequence task (``--task``): an encoder-decoder, scored by exact match.

    Problems are generated on the fly from a generator seeded ``seed + rank`` (no data files, no
    tokenizer: ids 0-2 are special, the symbols start at 3); ``eval_examples`` held-out problems
    come from a seed of their own.  Cost per step: one forward and backward pass over a batch of
    ``batch_size`` problems; evaluation decodes every held-out problem greedily with the KV cache.
    """

    kind, default_preset, model_class = "encoder-decoder", "seq2seq", EncoderDecoderTransformer

    def model_overrides(self, model_over: Dict[str, Any], given: Dict[str, Any]) -> Dict[str, Any]:
        tcfg = self.tcfg
        vocab = given.get("vocab_size") or model_over.get("vocab_size", 16)  # 0-2 special, 3.. symbols
        model_over = dict(model_over, vocab_size=vocab, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                          extra={"task": tcfg.task, "task_min_len": tcfg.task_min_len,
                                 "task_max_len": tcfg.task_max_len})
        need = 2 * tcfg.task_max_len + 2 if tcfg.task == "add" else tcfg.task_max_len + 2
        model_over["max_seq_len"] = max(model_over.get("max_seq_len", 0), need)
        return model_over

    def make_data(self, mcfg: ModelConfig) -> None:
        tcfg = self.tcfg
        self.vocab_size = mcfg.vocab_size
        self.data = torch.Generator().manual_seed(tcfg.seed + self.ctx.rank)
        self.problems = make_eval_problems(tcfg.task, tcfg.eval_examples, tcfg.seed + 1_000_003, tcfg.task_min_len,
                                           tcfg.task_max_len, mcfg.vocab_size)

    def data_state(self) -> Dict[str, Any]:
        return {"generator_state": self.data.get_state()}

    def load_data_state(self, state: Dict[str, Any]) -> None:
        self.data.set_state(state["generator_state"])

    def train_loss(self, model: nn.Module) -> Tuple[torch.Tensor, int]:
        tcfg = self.tcfg
        batch = make_seq2seq_batch(tcfg.task, tcfg.batch_size, self.data, tcfg.task_min_len, tcfg.task_max_len,
                                   self.vocab_size)
        batch = type(batch)(*(t.to(self.device) for t in batch))
        with autocast(self.device, self.dtype):
            loss = seq2seq_loss(model, batch)
        return loss, int(batch.tgt_mask.sum()) * self.ctx.world_size

    def evaluate(self, model: nn.Module) -> Dict[str, float]:
        acc, loss = evaluate_seq2seq(model, self.problems, device=self.device)
        return {"val_loss": loss, "exact_match": acc}

    def describe(self, metrics: Dict[str, float]) -> Tuple[Dict[str, Any], str]:
        return {}, f", exact match {metrics['exact_match']:.1%} on {self.tcfg.eval_examples} held-out problems"

    def final_evaluation(self, model: nn.Module) -> Dict[str, Any]:
        tcfg = self.tcfg
        acc, loss = evaluate_seq2seq(model, self.problems, device=self.device)
        self.log(f"final: best/ exact match {acc:.2%} on {tcfg.eval_examples} held-out '{tcfg.task}' problems "
                 f"(greedy decoding with the KV cache), loss {loss:.4f}")
        return dict(val_loss=loss, exact_match=acc, task=tcfg.task, eval_examples=tcfg.eval_examples)


#: ``--model`` -> the task that trains it.
TASKS: Dict[str, type] = {task.kind: task for task in (LanguageModelTask, Seq2SeqTask)}
