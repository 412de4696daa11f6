"""Streaming detokenisation: text pieces that are safe to print, as token ids arrive one by one.

Decoding each new id on its own is wrong in two ways:

* **Multi-byte characters.**  A byte-level BPE (GPT-2, Llama 3, Qwen) or a byte-fallback
  SentencePiece piece may hold *part* of a UTF-8 character: "🙂" can be four ids.  Decoded alone,
  each part is the replacement character U+FFFD.
* **Context-dependent pieces.**  Some decoders look at neighbours: a SentencePiece ``▁the`` is
  `` the`` after another piece but ``the`` at the start of a text (the leading space is stripped),
  and byte-level pieces join bytes across ids.

So :class:`IncrementalDetokenizer` decodes a short *window* that ends with the new ids and starts
at the ids of the last printed piece (the "prefix"), and emits only the text the new ids added to
the prefix's text (the method of Hugging Face's text-generation-inference and vLLM).  Text ending
in U+FFFD is held back until the character's other bytes arrive.  Both decodes start at the same
id, so whatever a decoder does at the start of a text (strip a space) it does to both, and the
difference is exactly the new text.  A window never starts inside a character: pieces are only
printed when the text is whole, and the next window starts there.

Cost: two decodes of ``prefix + held`` ids per new id, where ``prefix`` is the last piece's ids
(usually 1) and ``held`` the ids not printed yet (1-3 inside a multi-byte character; a run of
byte-fallback pieces that is not valid UTF-8 yet): O(1) per token, against O(n) for decoding the
whole sequence each time.
"""

from __future__ import annotations

from typing import Iterable, List, Sequence

REPLACEMENT_CHAR = "\ufffd"  # what decoders write for bytes that are not (yet) a whole UTF-8 character


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text pieces that never need to be taken back.

    Args:
        tokenizer: anything with ``decode(ids) -> str`` (this project's tokenizers, an
            :class:`~transformer.hf_tokenizer.HFTokenizer`).
        prompt_ids: ids already shown (the prompt); their text is not emitted again, but they are
            the context the first new ids are decoded with.
        window: how many prompt ids the first decode starts before the new ones (context for
            the first piece; 5 is what vLLM uses).  Later windows start at the last piece.

    ``add(ids)`` returns the new text (possibly ``""``); ``finish()`` returns what was held back
    (e.g. a character left incomplete by a generation cut short, as U+FFFD).  The pieces joined
    equal ``tokenizer.decode(prompt_ids + ids)[len(tokenizer.decode(prompt_ids)):]`` for decoders
    whose output for a sequence extends their output for its prefix (byte-level BPE,
    SentencePiece, this project's byte tokenizer).
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int] = (), window: int = 5):
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window={window!r}; expected an int >= 1 (ids of context before the new ones)")
        self.tokenizer, self.window = tokenizer, window
        self.ids: List[int] = [int(i) for i in prompt_ids]
        self.read_offset = len(self.ids)  # ids before this are printed
        # Each decode starts at prefix_offset: a few prompt ids back at first, moved back further
        # if that would start inside a character (its bytes alone decode to U+FFFD, and a
        # byte-fallback decoder would then spoil the whole run of byte pieces it belongs to).
        start = max(0, self.read_offset - window)
        while start > 0 and tokenizer.decode(self.ids[start:self.read_offset]).startswith(REPLACEMENT_CHAR):
            start -= 1
        self.prefix_offset = start

    def add(self, ids: Iterable[int]) -> str:
        """Append ``ids`` and return the text they complete ("" while a character is unfinished)."""
        self.ids.extend(int(i) for i in ids)
        return self._emit(final=False)

    def finish(self) -> str:
        """The text still held back (an unfinished character decodes to U+FFFD here)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if len(self.ids) == self.read_offset:
            return ""
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = decode(self.ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or (not final and new_text.endswith(REPLACEMENT_CHAR)):
            return ""  # nothing visible yet (a special token skipped), or a character still forming
        piece = new_text[len(prefix_text):]
        # The next window starts where this piece's ids start: a point where the text was whole
        # (we only emit then), so no character is ever cut at a window's start.
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return piece
