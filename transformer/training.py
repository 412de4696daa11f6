"""The pieces of a training loop, by one name: ``from transformer import training as T``.

``train.py`` is the loop you read top to bottom; its parts live in modules of their own, each
small enough to read and test on its own, and are all importable from here:

* :mod:`transformer.train_config` -- :class:`TrainConfig` (every training knob) and
  :data:`PRESETS` (named bundles of model + training settings: ``cpu`` is the default,
  ``draft`` a tiny model for speculative decoding, ``gpu`` a larger one, ``tiny`` for tests,
  ``seq2seq`` for the synthetic encoder-decoder tasks).
* :mod:`transformer.tasks` -- what a run learns and how it is scored, behind one interface:
  :class:`LanguageModelTask` and :class:`Seq2SeqTask`.
* :mod:`transformer.losses` -- :func:`lm_loss`, :func:`evaluate_lm`, :func:`seq2seq_loss`,
  :func:`evaluate_seq2seq`: the losses, the validation loss (sharded over ranks) and
  exact-match accuracy by greedy decoding.
* :mod:`transformer.distill` -- :func:`distill_loss`, :func:`teacher_continuations`: training a
  speculative-decoding draft on the KL divergence to a teacher, and on text the teacher writes.
* :mod:`transformer.optim` -- :func:`configure_optimizer`, :func:`make_scheduler`: AdamW with
  weight decay on matrices only; linear warmup then cosine decay to ``min_lr_ratio * lr``.
* :mod:`transformer.machine` -- :func:`resolve_device`, :func:`resolve_dtype`, :func:`autocast`,
  :func:`set_threads`, :class:`ThreadTuner`, :func:`rng_state` / :func:`set_rng_state` (what a
  resumed run restores to draw the same dropout masks), :func:`machine_info`.
* :mod:`transformer.distributed` -- :class:`Distributed`, :func:`init_distributed`,
  :func:`shutdown_distributed`: the few lines of ``torch.distributed`` that
  ``torchrun --nproc_per_node=N train.py`` needs.

What a run directory holds, and how nothing in it is lost, is :mod:`transformer.run_dir`;
every checkpoint folder is written atomically by :func:`transformer.checkpoint.save_checkpoint`.
"""

from .distill import distill_loss, load_teacher, teacher_continuations, teacher_text_batches
from .distributed import Distributed, all_gather_objects, barrier, init_distributed, shutdown_distributed
from .losses import evaluate_lm, evaluate_seq2seq, lm_loss, make_eval_problems, seq2seq_loss
from .machine import (ThreadTuner, autocast, available_cores, cpu_has_fast_bf16, cpu_model, load_average,
                      machine_info, resolve_device, resolve_dtype, rng_state, set_rng_state, set_threads)
from .optim import WarmupCosine, configure_optimizer, make_scheduler
from .tasks import TASKS, LanguageModelTask, Seq2SeqTask, Task
from .train_config import (DTYPES, MODEL_KINDS, PRESETS, TOKENIZER_TYPES, SetupError, TrainConfig, preset_overrides,
                           train_config_from_dict)

__all__ = [
    "TrainConfig", "PRESETS", "MODEL_KINDS", "TOKENIZER_TYPES", "DTYPES", "SetupError", "preset_overrides",
    "train_config_from_dict",
    "Task", "LanguageModelTask", "Seq2SeqTask", "TASKS",
    "lm_loss", "evaluate_lm", "seq2seq_loss", "make_eval_problems", "evaluate_seq2seq",
    "distill_loss", "teacher_continuations", "load_teacher", "teacher_text_batches",
    "configure_optimizer", "WarmupCosine", "make_scheduler",
    "resolve_device", "cpu_has_fast_bf16", "resolve_dtype", "autocast", "available_cores", "set_threads",
    "ThreadTuner", "rng_state", "set_rng_state", "cpu_model", "load_average", "machine_info",
    "Distributed", "init_distributed", "barrier", "all_gather_objects", "shutdown_distributed",
]
