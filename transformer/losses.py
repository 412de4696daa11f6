"""Training losses and the validation numbers built on them, for both kinds of model.

* :func:`lm_loss`, :func:`evaluate_lm` -- next-token cross-entropy of a decoder-only language
  model, and its mean over a validation stream (sharded over data-parallel ranks).
* :func:`seq2seq_loss`, :func:`make_eval_problems`, :func:`evaluate_seq2seq` -- teacher-forced
  cross-entropy of an encoder-decoder, the fixed held-out problems, and exact-match accuracy by
  greedy decoding with the KV cache.

Every loss is in nats per token and computed in float32, whatever the autocast dtype.  The
distillation loss of a speculative-decoding draft lives with the rest of distillation
(:func:`transformer.distill.distill_loss`); :mod:`transformer.tasks` says which loss a run uses.
"""

from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import EOS_ID, PAD_ID, exact_match, iter_eval_batches, make_seq2seq_batch
from .machine import autocast


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats/token): ``x``, ``y`` ``(B, T)`` -> scalar.

    Logits are upcast to float32 first: a bfloat16 softmax over thousands of tokens is too coarse.
    """
    logits = model(x)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def evaluate_lm(model: nn.Module, tokens: torch.Tensor, block_size: int, batch_size: int,
                max_batches: Optional[int] = None, device: torch.device = torch.device("cpu"),
                dtype: torch.dtype = torch.float32, rank: int = 0, world_size: int = 1,
                progress: Optional[Iterable] = None) -> float:
    """Mean loss in nats/token over a validation stream (every token once, or the first
    ``max_batches`` batches of :func:`~transformer.data.iter_eval_batches`).

    With ``world_size > 1`` each rank scores every ``world_size``-th batch and the sums are
    all-reduced, so all ranks return the same number.  Cost: forward passes only over
    ``len(tokens)`` tokens (or ``max_batches * batch_size * block_size``).
    """
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of nats, count of targets)
    batches = iter_eval_batches(tokens, block_size, batch_size, max_batches=max_batches or None)
    for i, (x, y) in enumerate(batches):
        if i % world_size != rank:
            continue
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            logits = model(x)
        total[0] += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                                    reduction="sum").double()
        total[1] += y.numel()
        if progress is not None:
            progress.update(1)
    if world_size > 1:
        torch.distributed.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1].clamp(min=1)).item()


def seq2seq_loss(model: nn.Module, batch) -> torch.Tensor:
    """Teacher-forced cross-entropy of a :class:`~transformer.data.Seq2SeqBatch` (padding ignored)."""
    logits = model(batch.src, batch.tgt_in, src_mask=batch.src_mask)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch.tgt_out.reshape(-1),
                           ignore_index=PAD_ID)


def make_eval_problems(task: str, n: int, seed: int, min_len: int, max_len: int, vocab_size: int):
    """The fixed held-out problems: ``n`` examples drawn from their own seed (never the training
    generator's).  Returns a :class:`~transformer.data.Seq2SeqBatch`."""
    gen = torch.Generator().manual_seed(seed)
    return make_seq2seq_batch(task, n, gen, min_len, max_len, vocab_size)


@torch.no_grad()
def evaluate_seq2seq(model: nn.Module, problems, batch_size: int = 250,
                     device: torch.device = torch.device("cpu")) -> Tuple[float, float]:
    """``(exact_match, loss)`` of ``model`` on ``problems`` (a ``Seq2SeqBatch``).

    Answers come from greedy decoding with the KV cache (``model.generate``), stopping at EOS;
    a row is right only if every answer token and the EOS are right.  The loss is the
    teacher-forced cross-entropy, for comparison with the training loss.
    """
    was_training = model.training
    model.eval()
    n = problems.src.shape[0]
    correct, loss_sum = 0.0, 0.0
    for start in range(0, n, batch_size):
        rows = slice(start, min(n, start + batch_size))
        part = type(problems)(*(t[rows].to(device) for t in problems))
        out = model.generate(part.src, max_new_tokens=part.tgt_out.shape[1], src_mask=part.src_mask,
                             eos_token_id=EOS_ID, pad_token_id=PAD_ID)
        correct += exact_match(out[:, 1:].cpu(), part.tgt_out.cpu()) * part.src.shape[0]
        loss_sum += seq2seq_loss(model, part).item() * part.src.shape[0]
    model.train(was_training)
    return correct / n, loss_sum / n
