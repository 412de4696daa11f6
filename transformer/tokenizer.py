"""Tokenizers: text <-> lists of integer ids, losslessly.

Two tokenizers share one interface (``encode``, ``decode``, ``vocab_size``, ``pad_id``,
``bos_id``, ``eos_id``, ``unk_id``, ``save(dir)``, ``load(path)``):

* :class:`Tokenizer` wraps a SentencePiece BPE or unigram model trained in-process, in seconds.
* :class:`ByteTokenizer` maps each UTF-8 byte to one id: no training, tiny vocabulary, long
  sequences.  Good for tests and ``--tokenizer bytes``.

Both reserve the same special ids, so code never has to ask which tokenizer it holds:

====  =====  ================================================================
id    name   meaning
====  =====  ================================================================
0     PAD    filler in padded batches; never produced by ``encode``
1     BOS    beginning of sequence (``encode(..., add_bos=True)``)
2     EOS    end of sequence / document separator
3     UNK    unknown; never produced thanks to byte fallback
====  =====  ================================================================

Both are *lossless*: ``decode(encode(text)) == text`` for every Python string that is valid
Unicode (spaces, tabs, newlines, blank lines, emoji, Chinese...).  SentencePiece needs four
settings for that, all explained in :meth:`Tokenizer.train`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterable, Iterator, List, Sequence, Union

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
MODEL_FILENAME = "tokenizer.model"      # SentencePiece model (protobuf)
BYTES_FILENAME = "tokenizer.json"       # marker written by ByteTokenizer.save
_SPACE_MARK = "\u2581"                  # "▁": SentencePiece's internal stand-in for a space


def _texts(texts) -> Iterator[str]:
    if isinstance(texts, str):
        texts = [texts]
    for t in texts:
        yield t.text if hasattr(t, "text") else t


def _training_sentences(texts, max_chars: int) -> Iterator[str]:
    # One "sentence" per non-empty line: SentencePiece learns pieces within sentences, so no
    # piece spans a line break, and lines longer than max_chars are chunked (the trainer would
    # silently skip them).
    for text in _texts(texts):
        for line in text.split("\n"):
            for i in range(0, len(line), max_chars):
                yield line[i:i + max_chars]


def _check_ids(ids: Sequence[int], vocab_size: int) -> List[int]:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"ids contains {bad[0]} (and {len(bad) - 1} more out of range); "
                         f"expected ids in [0, vocab_size={vocab_size})")
    return ids


class Tokenizer:
    """A SentencePiece subword tokenizer with fixed special ids and lossless round trips.

    Build one with :meth:`train` (or :meth:`load` a saved one), then::

        ids = tok.encode("To be, or not to be\\n")   # list[int], each in [0, vocab_size)
        tok.decode(ids)                              # "To be, or not to be\\n"

    Cost: encoding runs at several MB/s in C++; the model file is a few hundred KB.
    """

    FILENAME = MODEL_FILENAME  # what save() writes and load() reads in a folder

    def __init__(self, model_proto: bytes, source: str = "<memory>"):
        import sentencepiece as spm

        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self._proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError on garbage input
            raise ValueError(f"{source} is not a valid SentencePiece model (corrupt or another format): "
                             f"{e}") from None
        # A literal "▁" in user text would decode as a space; we emit it as raw byte pieces.
        self._mark_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _SPACE_MARK.encode("utf-8")]
        if any(i == self._sp.unk_id() for i in self._mark_ids):
            self._mark_ids = None  # model trained without byte_fallback (foreign model)

    # ---- training -------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Union[str, Iterable], vocab_size: int = 4096, model_type: str = "bpe",
              out_dir: Union[str, Path, None] = None, input_sentence_size: int = 300_000,
              max_sentence_chars: int = 2000, num_threads: int = 2,
              **sp_options) -> "Tokenizer":
        """Train a tokenizer on ``texts`` in memory and return it (also saved if ``out_dir``).

        Args:
            texts: a string, or an iterable of strings or of :class:`~transformer.data.Document`.
            vocab_size: total ids, specials included.  Must exceed 4 specials + the newline
                piece + 256 byte pieces + every distinct character of ``texts``
                (about 350 for Shakespeare); 2048-8192 is typical for this corpus.
            model_type: ``"bpe"`` (merge frequent pairs) or ``"unigram"`` (prune a big vocabulary
                by likelihood).  BPE trains in about half a second on the plays, unigram in about 5 s.
            out_dir: if given, :meth:`save` into it.
            input_sentence_size: at most this many lines are sampled for training, which caps
                the training time on big corpora (the plays have ~190k lines).
            max_sentence_chars: longer lines are cut into chunks of this many characters.
            sp_options: passed through to ``SentencePieceTrainer.train`` (e.g. ``split_digits``).

        What makes the round trip lossless:

        * ``normalization_rule_name="identity"``: no NFKC folding (``ﬁ`` stays ``ﬁ``).
        * ``remove_extra_whitespaces=False`` and ``add_dummy_prefix=False``: runs of spaces
          survive and no space is invented at the start.
        * ``user_defined_symbols=["\\n"]``: SentencePiece would otherwise treat a newline as
          unknown/whitespace; as a user symbol it is its own piece (id 4).
        * ``byte_fallback=True``: any character not in the vocabulary is spelled as its UTF-8
          bytes (pieces ``<0x00>``..``<0xFF>``), so nothing becomes UNK.

        Cost: BPE with vocab 4096 on the 4.9M-character plays takes about a second on 2 cores.
        """
        import sentencepiece as spm

        if model_type not in ("bpe", "unigram"):
            raise ValueError(f"model_type={model_type!r}; expected 'bpe' or 'unigram'")
        if not isinstance(vocab_size, int) or vocab_size < 262:
            raise ValueError(f"vocab_size={vocab_size!r} is too small; expected an int >= 262 "
                             f"(4 specials + newline + 256 bytes + at least one learned piece)")
        sentences = (s for s in _training_sentences(texts, max_sentence_chars) if s)
        model = io.BytesIO()
        options = dict(
            sentence_iterator=sentences, model_writer=model, vocab_size=vocab_size, model_type=model_type,
            pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID, byte_fallback=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            user_defined_symbols=["\n"], allow_whitespace_only_pieces=True, character_coverage=1.0,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            max_sentence_length=4 * max_sentence_chars + 16, num_threads=num_threads, minloglevel=2)
        options.update(sp_options)
        try:
            spm.SentencePieceTrainer.train(**options)
        except RuntimeError as e:
            advice = (" (a smaller vocab_size or more text fixes 'Vocabulary size too high'; a larger "
                      "one fixes 'smaller than required_chars')" if "ocab" in str(e) else "")
            raise ValueError(f"SentencePiece training failed with vocab_size={vocab_size}, "
                             f"model_type={model_type!r}: {e}{advice}") from None
        tok = cls(model.getvalue(), source="freshly trained model")
        if out_dir is not None:
            tok.save(out_dir)
        return tok

    # ---- encode / decode ------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> List[int]:
        """Ids for ``text`` (a ``str``); optional BOS in front / EOS at the end."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if self._mark_ids is not None and _SPACE_MARK in text:
            ids: List[int] = []
            for i, part in enumerate(text.split(_SPACE_MARK)):
                if i:
                    ids.extend(self._mark_ids)
                ids.extend(self._sp.encode(part))
        else:
            ids = self._sp.encode(text)
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        """Text for ``ids`` (list, tuple or 1-D tensor); PAD/BOS/EOS decode to nothing."""
        return self._sp.decode(_check_ids(ids, self.vocab_size))

    def id_to_piece(self, i: int) -> str:
        """The vocabulary entry of id ``i`` (e.g. ``"▁the"``, ``"<0xE4>"``, ``"\\n"``)."""
        return self._sp.id_to_piece(_check_ids([i], self.vocab_size)[0])

    @property
    def vocab_size(self) -> int:
        """Number of ids, specials and byte pieces included (ids are ``0..vocab_size-1``)."""
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        """Padding id (0)."""
        return self._sp.pad_id()

    @property
    def bos_id(self) -> int:
        """Beginning-of-sequence id (1)."""
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        """End-of-sequence / document-separator id (2)."""
        return self._sp.eos_id()

    @property
    def unk_id(self) -> int:
        """Unknown id (3); never produced thanks to byte fallback."""
        return self._sp.unk_id()

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"

    # ---- files ----------------------------------------------------------------------------

    def save(self, directory: Union[str, Path]) -> Path:
        """Write ``<directory>/tokenizer.model`` (creating the folder) and return its path."""
        path = Path(directory) / MODEL_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self._proto)
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Tokenizer":
        """Load from a ``tokenizer.model`` file or a folder holding one.

        Raises ``FileNotFoundError`` naming the path if missing, ``ValueError`` if corrupt.
        """
        path = Path(path)
        file = path / MODEL_FILENAME if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer at {str(file)!r}; expected a SentencePiece "
                                    f"{MODEL_FILENAME} (train one with Tokenizer.train or train.py)")
        return cls.from_bytes(file.read_bytes(), source=file)

    @classmethod
    def from_bytes(cls, data: bytes, source: Union[str, Path] = "<memory>") -> "Tokenizer":
        """The tokenizer whose ``tokenizer.model`` file holds ``data`` (e.g. read with a checkpoint).

        ``source`` names where the bytes came from in the ``ValueError`` raised if they are not a
        SentencePiece model.  Cost: parses the model (milliseconds).
        """
        return cls(data, source=repr(str(source)))


class ByteTokenizer:
    """UTF-8 bytes as tokens: byte ``b`` is id ``b + 4``; ids 0-3 are PAD/BOS/EOS/UNK.

    ``vocab_size`` is 260.  Every string round-trips; a text of ``n`` UTF-8 bytes becomes ``n``
    ids (about one per character for English, three or four per Chinese character or emoji).
    Decoding an id sequence that is not valid UTF-8 (e.g. a sampled half of a character)
    inserts U+FFFD instead of failing.
    """

    OFFSET = 4
    FILENAME = BYTES_FILENAME  # what save() writes and load() reads in a folder
    vocab_size = 256 + OFFSET
    pad_id, bos_id, eos_id, unk_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> List[int]:
        """Ids for ``text``: one per UTF-8 byte, plus optional BOS/EOS."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = [b + self.OFFSET for b in text.encode("utf-8")]
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        """Text for ``ids``; special ids are skipped."""
        ids = _check_ids(ids, self.vocab_size)
        return bytes(i - self.OFFSET for i in ids if i >= self.OFFSET).decode("utf-8", errors="replace")

    def id_to_piece(self, i: int) -> str:
        """Readable name of id ``i``: ``"<pad>"``, ``"<s>"``, ``"</s>"``, ``"<unk>"`` or ``"<0xNN>"``."""
        i = _check_ids([i], self.vocab_size)[0]
        return ["<pad>", "<s>", "</s>", "<unk>"][i] if i < self.OFFSET else f"<0x{i - self.OFFSET:02X}>"

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=260)"

    def save(self, directory: Union[str, Path]) -> Path:
        """Write ``<directory>/tokenizer.json`` (a small marker: nothing to learn) and return it."""
        path = Path(directory) / BYTES_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"type": "bytes", "offset": self.OFFSET}) + "\n")
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "ByteTokenizer":
        """Load from a ``tokenizer.json`` written by :meth:`save` (or a folder holding one)."""
        path = Path(path)
        file = path / BYTES_FILENAME if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no byte tokenizer at {str(file)!r}; expected {BYTES_FILENAME}")
        return cls.from_bytes(file.read_bytes(), source=file)

    @classmethod
    def from_bytes(cls, data: bytes, source: Union[str, Path] = "<memory>") -> "ByteTokenizer":
        """The tokenizer whose ``tokenizer.json`` file holds ``data`` (e.g. read with a checkpoint).

        ``ValueError`` naming ``source`` (where the bytes came from) unless ``data`` is the marker
        :meth:`save` writes.  Cost: parses a few bytes of JSON.
        """
        try:
            spec = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{str(source)!r} is not a valid {BYTES_FILENAME} ({e})") from None
        if spec != {"type": "bytes", "offset": cls.OFFSET}:
            raise ValueError(f"{str(source)!r} describes {spec!r}; expected a ByteTokenizer with offset "
                             f"{cls.OFFSET}")
        return cls()


def load_tokenizer(path: Union[str, Path]) -> Union[Tokenizer, ByteTokenizer]:
    """Load whichever tokenizer ``path`` holds: ``tokenizer.model`` -> :class:`Tokenizer`,
    ``tokenizer.json`` -> :class:`ByteTokenizer` (a folder, e.g. a checkpoint, or the file)."""
    path = Path(path)
    if path.is_dir():
        if (path / MODEL_FILENAME).is_file():
            return Tokenizer.load(path)
        if (path / BYTES_FILENAME).is_file():
            return ByteTokenizer.load(path)
        raise FileNotFoundError(f"folder {str(path)!r} holds neither {MODEL_FILENAME} nor {BYTES_FILENAME}")
    return ByteTokenizer.load(path) if path.suffix == ".json" else Tokenizer.load(path)
