"""Distillation: how the draft model of speculative decoding learns to guess what its target says.

A draft is useful only as far as the target accepts its guesses, so it is trained on the
target (the *teacher*), not only on the corpus:

* :func:`distill_loss` -- the KL divergence to the teacher's whole next-token distribution
  (mixed with the ordinary cross-entropy by a weight);
* :func:`teacher_continuations` -- text the teacher writes itself from training-text prompts,
  so the draft also learns on the kind of text it will draft for;
* :func:`load_teacher`, :func:`teacher_text_batches` -- what ``train.py --teacher`` does with
  them: load the frozen teacher, and fill a fraction of every batch with its text
  (:class:`~transformer.data.MixedBatches`).

Measured on the default pair (``benchmarks/draft_agreement.py``): the draft's greedy guess
matches the target's 70% of the time trained on the text alone, 84% distilled on the corpus,
90% distilled on the corpus and the teacher's text.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from . import checkpoint
from .checkpoint import CheckpointError
from .data import MixedBatches, TokenDataset, random_windows
from .train_config import SetupError, TrainConfig


def distill_loss(model: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 weight: float = 1.0) -> torch.Tensor:
    """Knowledge distillation (Hinton et al. 2015) for a speculative-decoding draft.

    ``(1 - weight) * CE(student, y) + weight * KL(p_teacher || p_student)``, both in nats per
    token, for ``x``, ``y`` ``(B, T)``.  The KL term trains the student on the teacher's whole
    next-token distribution at every position -- its near-misses as well as its favourite --
    which is what the acceptance test of speculative decoding compares (``min(1, p / q)``),
    so a distilled draft is accepted more often than one trained on the text alone
    (DistillSpec, Zhou et al. 2023).  ``weight=0`` is plain :func:`~transformer.losses.lm_loss`.

    Cost: one extra forward pass of the (frozen, no-grad) teacher per batch, and two
    ``(B, T, V)`` float32 log-probability tensors.
    """
    logits = model(x).float()
    logp = F.log_softmax(logits, dim=-1).reshape(-1, logits.shape[-1])
    loss = logits.new_zeros(())
    if weight < 1:
        loss = (1 - weight) * F.nll_loss(logp, y.reshape(-1))
    if weight > 0:
        with torch.no_grad():
            t_logp = F.log_softmax(teacher(x).float(), dim=-1).reshape(-1, logits.shape[-1])
        loss = loss + weight * F.kl_div(logp, t_logp, log_target=True, reduction="batchmean")
    return loss


@torch.no_grad()
def teacher_continuations(teacher: nn.Module, tokens: torch.Tensor, num: int, length: int, *,
                          prompt_len: int = 32, temperatures: Sequence[float] = (0.0, 0.8, 1.0),
                          batch_size: int = 256, seed: int = 0,
                          progress: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """Text written by the teacher: ``num`` sequences ``(num, length)`` (long, on the CPU).

    Each sequence is a random ``prompt_len``-token window of the training stream ``tokens``
    followed by ``length - prompt_len`` tokens the teacher generates with its KV cache.  The
    ``num`` sequences are split evenly over ``temperatures`` (``0`` = greedy).

    Why: a draft model drafts *continuations of the target's own output*, not of Shakespeare.
    Distilling on the corpus alone (:func:`distill_loss`) teaches the draft the target's
    distribution on human text; adding text the target wrote (sequence-level distillation,
    Kim & Rush 2016; DistillSpec, Zhou et al. 2023) trains it where it will be used.  Greedy
    continuations serve temperature-0 decoding, sampled ones keep the draft's whole
    distribution close for sampled decoding.  Measured on the default pair: the draft's greedy
    guess matches the target's 90% of the time instead of 84% (``benchmarks/draft_agreement.py``).

    Args:
        teacher: a decoder-only model (eval mode is set here; gradients are never taken).
        tokens: 1-D long training stream (prompts come from it, never from validation text).
        num, length: how many sequences, and tokens per sequence (prompt included).
        prompt_len: tokens of real text that start each sequence (``1 <= prompt_len < length``).
        temperatures: sampling temperature of each group (``0`` greedy, otherwise plain
            sampling at that temperature: no top-k / top-p).
        batch_size: sequences decoded together.
        seed: prompts and sampling are drawn from generators seeded with it (same teacher and
            seed on the same device -> the same sequences, so a resumed run rebuilds its data).
        progress: called with the number of sequences finished after every batch.

    Cost: ``num * (length - prompt_len)`` teacher decode steps, in batches (on a 2-core CPU,
    3072 sequences of 256 tokens from the 4.2M default model take about two minutes).
    """
    for name, v in (("num", num), ("length", length), ("prompt_len", prompt_len), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if prompt_len >= length:
        raise ValueError(f"prompt_len={prompt_len} must be < length={length} (the teacher writes the rest)")
    temperatures = list(temperatures)
    if not temperatures or any(not isinstance(t, (int, float)) or t < 0 for t in temperatures):
        raise ValueError(f"temperatures must be a non-empty list of numbers >= 0, got {temperatures!r}")
    tokens = torch.as_tensor(tokens).reshape(-1)
    if len(tokens) < prompt_len:
        raise ValueError(f"tokens holds {len(tokens)} ids, fewer than prompt_len={prompt_len}")
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    picks = torch.Generator().manual_seed(seed)
    sampler = torch.Generator(device=device).manual_seed(seed + 1)
    out, done = [], 0
    for group, temperature in enumerate(temperatures):
        count = num // len(temperatures) + (group < num % len(temperatures))
        for start in range(0, count, batch_size):
            rows = min(batch_size, count - start)
            prompts = random_windows(tokens, rows, prompt_len, picks).to(device)
            sample = temperature > 0
            seqs = teacher.generate(prompts, length - prompt_len, eos_token_id=None, do_sample=sample,
                                    temperature=temperature if sample else 1.0,
                                    generator=sampler if sample else None)
            out.append(seqs.cpu())
            done += rows
            if progress is not None:
                progress(done)
    teacher.train(was_training)
    return torch.cat(out)


def load_teacher(path: str, vocab_size: int, block_size: int, device: torch.device) -> nn.Module:
    """The frozen model to distil from (``--teacher``): eval mode, no gradients.

    It must be a decoder-only model with the student's vocabulary (``vocab_size``: both read
    one tokenizer) that can see a whole training window of ``block_size`` tokens; otherwise
    :class:`~transformer.train_config.SetupError` says what to change.
    """
    try:
        hint = "train the teacher first (python train.py) or pass its run directory"
        teacher = checkpoint.load_model(path, device=device, hint=hint)[0]
    except (CheckpointError, OSError) as e:
        raise SetupError(f"--teacher {path!r}: {e}") from None
    tv = teacher.config.vocab_size
    if hasattr(teacher, "encode") or tv != vocab_size:
        raise SetupError(f"--teacher {path!r} must be a decoder-only model with this run's "
                         f"vocabulary ({vocab_size} tokens), got {type(teacher).__name__} with {tv}: "
                         f"pass --tokenizer with the teacher's run directory so both share one tokenizer")
    if teacher.config.pos_encoding == "learned" and teacher.config.max_seq_len < block_size:
        raise SetupError(f"--teacher {path!r} has max_seq_len={teacher.config.max_seq_len} "
                         f"< --block-size {block_size}")
    teacher.requires_grad_(False)
    return teacher.eval()


def teacher_text_batches(teacher: nn.Module, train_ids: torch.Tensor, stream: TokenDataset, tcfg: TrainConfig, *,
                         rank: int, device: torch.device, log: Callable[[str], None],
                         show_progress: bool = True) -> MixedBatches:
    """``--teacher-samples``: the teacher writes its text, which then fills ``--teacher-mix`` of
    every batch drawn from ``stream``.

    The text is the same on every rank and again on ``--resume`` (seeded by ``tcfg.seed``), so
    only the batch draws (seeded by ``tcfg.seed + rank``) are saved in a checkpoint.  Cost:
    :func:`teacher_continuations` of ``tcfg.teacher_samples`` sequences, once per run.
    """
    length = min(tcfg.block_size + 1, teacher.config.max_seq_len)
    prompt_len = min(32, length // 2)
    log(f"the teacher writes {tcfg.teacher_samples} continuations of {length - prompt_len} tokens after "
        f"{prompt_len}-token training-text prompts (greedy, T=0.8, T=1.0) ...")
    t0 = time.perf_counter()
    bar = tqdm(total=tcfg.teacher_samples, desc="teacher text", unit="seq", dynamic_ncols=True,
               disable=not show_progress)
    seqs = teacher_continuations(teacher, train_ids, tcfg.teacher_samples, length, prompt_len=prompt_len,
                                 seed=tcfg.seed, progress=lambda done: bar.update(done - bar.n))
    bar.close()
    rows = round(tcfg.teacher_mix * tcfg.batch_size)
    log(f"teacher text: {seqs.numel():,} tokens in {time.perf_counter() - t0:.0f} s; {rows} of every "
        f"{tcfg.batch_size} rows per batch come from it")
    return MixedBatches(stream, seqs, rows, seed=tcfg.seed + 7919 + rank, device=device)
