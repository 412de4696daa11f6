"""Text in, text out for Hugging Face model folders: ``tokenizer.json``, EOS ids, chat templates.

A folder saved by ``transformers`` describes its tokenizer in three files, all read here without
``transformers``:

* ``tokenizer.json`` -- the whole tokenizer (normaliser, pre-tokeniser, model, post-processor,
  decoder), read by the ``tokenizers`` package.  Its post-processor adds the BOS token when the
  model expects one (Llama 3 does, Qwen does not), so ``encode`` follows it rather than guessing
  (``tokenizer_config.json``'s ``add_bos_token: true`` adds a BOS it leaves out; never two).
* ``tokenizer_config.json`` -- the special tokens' text (``bos_token``, ``eos_token``) and, for
  chat models, ``chat_template``: a Jinja template that turns a list of messages into the exact
  prompt text the model was trained on (``<|start_header_id|>user<|end_header_id|>...``).
* ``config.json`` / ``generation_config.json`` -- ``eos_token_id``, one id or a list (Llama 3
  instruct models end a turn with ``<|eot_id|>`` and a document with ``<|end_of_text|>``).

:func:`load_hf_tokenizer` gathers them into an :class:`HFTokenizer` with the interface the rest
of the project uses (``encode``, ``decode``, ``vocab_size``, ``eos_id``, ``bos_id``).
Streaming text as ids arrive is :mod:`transformer.detokenizer`'s job.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

PathLike = Union[str, Path]


def _read_json(file: Path) -> Dict[str, Any]:
    """A JSON object from ``file``, or ``{}`` if it is missing; ``ValueError`` naming it if broken."""
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(file)!r} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(file)!r} holds a {type(data).__name__}; expected a JSON object")
    return data


def _token_text(value: Any) -> Optional[str]:
    """A special token's text: ``"</s>"`` or ``{"content": "</s>", ...}`` (older files)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> List[int]:
    """``eos_token_id`` as a list: an int, a list of ints, or nothing."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


class HFTokenizer:
    """A Hugging Face folder's tokenizer: text <-> ids, its end-of-sequence ids, its chat template.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` (from ``tokenizer.json``).
        eos_ids: ids that end generation; the first is the one :attr:`eos_id` names.
        bos_token / eos_token / pad_token / unk_token: the special tokens' text (``None`` if the
            folder has none); BOS and EOS are also given to the chat template.
        chat_template: the Jinja source, or ``None`` if the folder has none.
        add_bos_token: ``tokenizer_config.json``'s flag (``None`` when absent).  BOS goes in front
            when the post-processor of ``tokenizer.json`` puts it there (Llama 3's does, Qwen's
            has no BOS at all) *or* this flag is true (as ``transformers`` 4's Llama and Gemma
            tokenizers did; ``transformers`` 5 ignores the flag when ``tokenizer.json`` exists),
            and never twice.  ``add_eos_token`` is not followed: a prompt that ends in EOS asks
            the model to start a new document.
        source: where it was read from (for messages).

    The interface is the project's tokenizers' (``encode``, ``decode``, ``vocab_size``,
    ``bos_id``, ``eos_id``, ``pad_id``, ``unk_id``, ``id_to_piece``), plus :attr:`eos_ids` and
    :meth:`apply_chat_template`.  Cost: linear in the text (Rust); no model is involved.
    """

    def __init__(self, tokenizer, eos_ids: Sequence[int] = (), bos_token: Optional[str] = None,
                 eos_token: Optional[str] = None, chat_template: Optional[str] = None, source: str = "<memory>",
                 add_bos_token: Optional[bool] = None,
                 pad_token: Optional[str] = None, unk_token: Optional[str] = None):
        self._tok = tokenizer
        self.eos_ids = list(dict.fromkeys(eos_ids))  # ordered, without repeats
        self.bos_token, self.eos_token, self.chat_template, self.source = bos_token, eos_token, chat_template, source
        self.bos_id = self._id_of(bos_token)
        self.pad_id, self.unk_id = self._id_of(pad_token), self._id_of(unk_token)
        # BOS of the post-processor: its own tokens for an empty text.
        post_bos = self.bos_id is not None and tokenizer.encode("", add_special_tokens=True).ids[:1] == [self.bos_id]
        self._flag_bos = bool(add_bos_token) and self.bos_id is not None and not post_bos
        self.add_bos = post_bos or self._flag_bos  # does encode() put BOS in front

    def _id_of(self, token: Optional[str]) -> Optional[int]:
        return self._tok.token_to_id(token) if token else None

    @property
    def eos_id(self) -> Optional[int]:
        """The main end-of-sequence id (the first of :attr:`eos_ids`), or ``None``."""
        return self.eos_ids[0] if self.eos_ids else None

    @property
    def vocab_size(self) -> int:
        """Number of ids, added special tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True, add_bos: Optional[bool] = None,
               add_eos: bool = False) -> List[int]:
        """Ids of ``text`` (a list of ints).

        ``add_special_tokens`` applies the folder's rule (BOS in front where the model expects
        one); a text that already starts with the BOS token's text (a rendered chat template, a
        prompt copied from a log) does not get a second one -- ``transformers`` would double it.
        ``add_bos`` / ``add_eos`` (the project tokenizers' keywords) force BOS on or off and
        append the main EOS id.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        bos = self.bos_id
        if add_special_tokens and self._flag_bos and ids[:1] != [bos]:
            ids = [bos] + ids  # tokenizer_config.json asks for a BOS the post-processor leaves out
        if add_special_tokens and bos is not None and ids[:2] == [bos, bos] and text.startswith(self.bos_token):
            ids = ids[1:]  # the text brought its own BOS
        if add_bos is not None and bos is not None:
            if add_bos and ids[:1] != [bos]:
                ids = [bos] + ids
            elif not add_bos and ids[:1] == [bos] and not text.startswith(self.bos_token):
                ids = ids[1:]
        if add_eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (a list or 1-D tensor); ``ValueError`` for an id outside the vocabulary.

        Special tokens (BOS, ``<|eot_id|>``...) decode to nothing unless ``skip_special_tokens``
        is false.  Ids that end inside a multi-byte character decode to U+FFFD there; see
        :mod:`transformer.detokenizer` for streaming."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids contains {bad[0]}; expected ids in [0, vocab_size={self.vocab_size})")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_piece(self, i: int) -> str:
        """The vocabulary entry of id ``i`` (byte-level pieces show spaces as ``Ġ``)."""
        piece = self._tok.id_to_token(int(i))
        if piece is None:
            raise ValueError(f"id {i!r} is not in the vocabulary; expected an id in [0, {self.vocab_size})")
        return piece

    def apply_chat_template(self, messages: List[Dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` (``[{"role": "user", "content": "..."}]``), rendered by
        the folder's Jinja template in a sandbox, as ``transformers`` renders it: the variables
        ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token`` and the helpers
        ``raise_exception`` and ``strftime_now``.  Encode the result with
        ``add_special_tokens=False``: templates write BOS themselves.  ``ValueError`` if the folder
        has no template or the template raises.  Cost: compiling the template (milliseconds)."""
        if not self.chat_template:
            raise ValueError(f"--chat: {self.source} has no chat_template (in tokenizer_config.json or "
                             f"chat_template.jinja); expected a chat model's folder. This model was not trained "
                             f"for chat: drop --chat and give the prompt as plain text")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except TemplateError as e:
            raise ValueError(f"the chat template of {self.source} failed: {e}") from None

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, eos_ids={self.eos_ids}, source={self.source})"


def load_hf_tokenizer(path: PathLike) -> HFTokenizer:
    """The :class:`HFTokenizer` of the Hugging Face folder ``path``.

    EOS ids, in order of preference: ``tokenizer_config.json``'s ``eos_token`` (the token a chat
    turn ends with) mapped through the vocabulary, then ``generation_config.json``'s and
    ``config.json``'s ``eos_token_id`` (one id or a list); generation stops at any of them.
    ``add_bos_token`` of ``tokenizer_config.json`` is read as :class:`HFTokenizer` explains.  ``FileNotFoundError`` naming the
    path if there is no ``tokenizer.json``; ``ValueError`` if a file is broken.  Cost: reading the files (a large vocabulary takes
    ~0.1-0.5 s).
    """
    import tokenizers

    folder = Path(path)
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {str(folder)!r}: expected the Hugging Face `tokenizers` file "
                                f"saved beside config.json (without it, give the prompt as token ids: --prompt-ids)")
    try:
        tok = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # the tokenizers package raises its own exception types
        raise ValueError(f"{str(file)!r} is not a Hugging Face `tokenizers` file: {type(e).__name__}: {e}") from None
    cfg = _read_json(folder / "tokenizer_config.json")
    bos, eos = _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template is None and (folder / "chat_template.jinja").is_file():  # transformers >= 4.50 saves it apart
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    eos_ids = [tok.token_to_id(eos)] if eos and tok.token_to_id(eos) is not None else []
    for name in ("generation_config.json", "config.json"):
        eos_ids += _ids(_read_json(folder / name).get("eos_token_id"))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    return HFTokenizer(tok, [i for i in eos_ids if 0 <= i < vocab], bos, eos,
                       template if isinstance(template, str) else None, source=repr(str(folder)),
                       pad_token=_token_text(cfg.get("pad_token")), unk_token=_token_text(cfg.get("unk_token")),
                       add_bos_token=cfg.get("add_bos_token") if isinstance(cfg.get("add_bos_token"), bool) else None)


def stop_at_eos(ids: Sequence[int], eos_ids: Sequence[int]) -> List[int]:
    """``ids`` up to and including the first of ``eos_ids`` (all of them if none occurs)."""
    ids = [int(i) for i in ids]
    hits = [k for k, i in enumerate(ids) if i in set(eos_ids)]
    return ids[:hits[0] + 1] if hits else ids
