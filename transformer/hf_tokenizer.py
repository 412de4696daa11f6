"""Text in, text out for Hugging Face model folders: ``tokenizer.json``, EOS ids, chat templates.

A folder saved by ``transformers`` describes its tokenizer in three files, all read here without
``transformers``:

* ``tokenizer.json`` -- the whole tokenizer (normaliser, pre-tokeniser, model, post-processor,
  decoder), read by the ``tokenizers`` package.  Its post-processor adds the BOS token when the
  model expects one (Llama 3 does, Qwen does not), so ``encode`` follows it rather than guessing.
* ``tokenizer_config.json`` -- the special tokens' text (``bos_token``, ``eos_token``) and, for
  chat models, ``chat_template``: a Jinja template that turns a list of messages into the exact
  prompt text the model was trained on (``<|start_header_id|>user<|end_header_id|>...``).
* ``config.json`` / ``generation_config.json`` -- ``eos_token_id``, one id or a list (Llama 3
  instruct models end a turn with ``<|eot_id|>`` and a document with ``<|end_of_text|>``).

:func:`load_hf_tokenizer` gathers them into an :class:`HFTokenizer` with the interface the rest
of the project uses (``encode``, ``decode``, ``vocab_size``, ``eos_id``, ``bos_id``).
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
        bos_token / eos_token: the special tokens' text (given to the chat template).
        chat_template: the Jinja source, or ``None`` if the folder has none.
        source: where it was read from (for messages).

    ``encode(text)`` applies the folder's post-processor (e.g. Llama 3's BOS) unless
    ``add_special_tokens=False``; ``decode(ids)`` drops special tokens unless asked to keep
    them.  Cost: linear in the text; no model is involved.
    """

    def __init__(self, tokenizer, eos_ids: Sequence[int] = (), bos_token: Optional[str] = None,
                 eos_token: Optional[str] = None, chat_template: Optional[str] = None, source: str = "<memory>"):
        self._tok = tokenizer
        self.eos_ids = list(dict.fromkeys(eos_ids))  # ordered, without repeats
        self.bos_token, self.eos_token, self.chat_template, self.source = bos_token, eos_token, chat_template, source
        self.bos_id = tokenizer.token_to_id(bos_token) if bos_token else None

    @property
    def eos_id(self) -> Optional[int]:
        """The main end-of-sequence id (the first of :attr:`eos_ids`), or ``None``."""
        return self.eos_ids[0] if self.eos_ids else None

    @property
    def vocab_size(self) -> int:
        """Number of ids, added special tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        """Ids of ``text``; the post-processor's special tokens (BOS...) when ``add_special_tokens``."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (a list or 1-D tensor); ``ValueError`` for an id outside the vocabulary."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids contains {bad[0]}; expected ids in [0, vocab_size={self.vocab_size})")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: List[Dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` (``[{"role": "user", "content": "..."}]``), rendered by
        the folder's Jinja template in a sandbox, as ``transformers`` renders it: the variables
        ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token`` and the helpers
        ``raise_exception`` and ``strftime_now``.  ``ValueError`` if the folder has no template."""
        if not self.chat_template:
            raise ValueError(f"{self.source} has no chat_template in tokenizer_config.json; this model was not "
                             f"trained for chat (drop --chat and give the prompt as plain text)")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
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
    turn ends with), then ``generation_config.json``'s and ``config.json``'s ``eos_token_id``
    (one id or a list).  ``FileNotFoundError`` naming the path if there is no ``tokenizer.json``;
    ``ValueError`` if a file is broken.  Cost: reading the files (a large vocabulary takes
    ~0.1-0.5 s).
    """
    import tokenizers

    folder = Path(path)
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {str(folder)!r}: expected the Hugging Face `tokenizers` file "
                                f"saved beside config.json (give the prompt as --prompt-ids instead)")
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
                       template if isinstance(template, str) else None, source=repr(str(folder)))


def stop_at_eos(ids: Sequence[int], eos_ids: Sequence[int]) -> List[int]:
    """``ids`` up to and including the first of ``eos_ids`` (all of them if none occurs)."""
    ids = [int(i) for i in ids]
    hits = [k for k, i in enumerate(ids) if i in set(eos_ids)]
    return ids[:hits[0] + 1] if hits else ids
