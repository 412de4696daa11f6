"""Turning logits into the next token: greedy, temperature, top-k, top-p (nucleus).

The order is fixed and matches common practice (Hugging Face, vLLM):

1. **temperature** ``T``: ``logits / T``.  ``T < 1`` sharpens, ``T > 1`` flattens, ``T -> 0``
   approaches greedy (``T = 0`` *is* greedy here; any tiny ``T > 0`` works, see
   :func:`process_logits`).  ``T`` must be finite.
2. **top-k**: keep the ``k`` largest logits (exactly ``k``: ties are broken by index).
3. **top-p**: of what is left, keep the smallest set of most likely tokens whose probability
   mass reaches ``p`` (the most likely token is always kept).

Removed tokens get ``-inf`` so that ``softmax`` gives them probability 0 and the survivors
are renormalised.  All functions work on a batch: ``logits`` is ``(B, V)``.
Cost: top-k is ``O(V log k)``; top-p sorts, ``O(V log V)`` per row.

**One set of settings.**  :class:`SamplingSettings` carries everything that decides which
token comes next (greedy or sampled, temperature, top-k, top-p, the random source, the stop
token) for every generation path, and :func:`validate_sampling_args` is the one check of
those values (each error names the parameter, the value and what was expected).  The paths
keep their own *defaults*, because the APIs they reproduce differ:

* ``generate`` / ``model.generate`` / ``FastDecoder.generate``: ``do_sample=False,
  temperature=1.0``, so **greedy**: Hugging Face's convention, sampling is opt-in.
* ``EnhancedTransformer.generate``: ``temperature=1.0``, ``do_sample`` unset, so it
  **samples**: the KV-cache tutorial's convention (``temperature=0`` for greedy).
* ``SpeculativeDecoder`` / ``speculative_generate`` / ``SpecDecodingPair``: ``temperature=0.0``,
  ``do_sample`` unset, so **greedy**: the speculative guide's default, where the output then
  equals the target's greedy output token for token.
* ``generate.py``: ``--temperature 0.8 --top-k 200 --top-p 0.95``, so it **samples** text
  (``--temperature 0`` for the encoder-decoder tasks, which have one right answer).

``do_sample`` unset (``None``) means "sample iff ``temperature > 0``"; ``temperature == 0``
is greedy whatever ``do_sample`` says, and ``do_sample=False`` is greedy whatever the
temperature.  So the same values mean the same on every path: the same tokens when greedy,
the same distribution when sampling (``FastDecoder`` draws its own noise on the device).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

import torch


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


#: The rule of each sampling value: ``name -> (test, what is expected)``.  The API's errors
#: (``top_p must be None or a number in (0, 1], got 1.5``) and generate.py's flags (``argument
#: --top-p: expected a number in (0, 1] (1 = off), got '1.5'``) are both worded from it.
SAMPLING_RULES = {
    "temperature": (lambda v: _number(v) and _finite(v) and v >= 0, "a finite number >= 0 (0 means greedy)"),
    "top_k": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an int >= 1"),
    "top_p": (lambda v: _number(v) and 0.0 < v <= 1.0, "a number in (0, 1]"),  # nan fails every comparison
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool) and -2 ** 63 <= v < 2 ** 64,
             "an int in [-2**63, 2**64) (what torch.Generator.manual_seed takes)"),
    "generator": (lambda v: isinstance(v, torch.Generator), "a torch.Generator"),
    "eos_token_id": (lambda v: _eos_ids(v) is not None,
                     "an int token id or a non-empty list of them (e.g. Llama 3's [128001, 128009])"),
}
#: values that may also be ``None`` (then: no top-k / no top-p / torch's global RNG / never stop)
_OPTIONAL = ("top_k", "top_p", "seed", "generator", "eos_token_id")


def _index(v) -> Optional[int]:
    try:
        return operator.index(v)  # int, numpy int, 0-d integer tensor
    except TypeError:
        return None


def _eos_ids(v):
    """``v`` as an int, or a tuple of >= 2 ints (a list of one is its int); ``None`` if neither."""
    if isinstance(v, (list, tuple)):
        ids = [None if isinstance(i, bool) else _index(i) for i in v]
        if not ids or None in ids:
            return None
        ids = tuple(dict.fromkeys(ids))
        return ids[0] if len(ids) == 1 else ids
    return None if isinstance(v, bool) else _index(v)


def eos_hit(tokens: torch.Tensor, eos) -> torch.Tensor:
    """Boolean tensor of ``tokens``' shape: which are an end-of-sequence id (``eos``: an int or a
    tuple of ints, as :class:`SamplingSettings` stores it).  Element-wise comparisons with Python
    ints only, so it compiles and is captured in CUDA graphs like ``tokens == eos``."""
    if isinstance(eos, tuple):
        hit = tokens == eos[0]
        for e in eos[1:]:
            hit = hit | (tokens == e)
        return hit
    return tokens == eos


def first_eos(eos):
    """The main end-of-sequence id of ``eos`` (an int, a tuple's first, or ``None``)."""
    return eos[0] if isinstance(eos, tuple) else eos


def sampling_value_problem(name: str, value) -> Optional[str]:
    """What sampling setting ``name`` must be if ``value`` breaks its rule, else ``None``
    (``None`` itself is not considered: the caller decides whether it is allowed)."""
    test, expected = SAMPLING_RULES[name]
    return None if test(value) else expected


def validate_sampling_args(temperature: float = 1.0, top_k: Optional[int] = None,
                           top_p: Optional[float] = None, **more) -> None:
    """The one check of sampling settings: raise a ``ValueError`` naming the first invalid one.

    ``more`` may hold ``seed``, ``generator`` and ``eos_token_id`` (see :class:`SamplingSettings`).
    Pure Python on the values given: no tensor work, no host sync.
    """
    unknown = sorted(set(more) - set(SAMPLING_RULES))
    if unknown:
        raise TypeError(f"validate_sampling_args() got unknown settings {unknown}; expected {list(SAMPLING_RULES)}")
    values = dict(temperature=temperature, top_k=top_k, top_p=top_p, **more)
    for name, value in values.items():
        if value is None and name in _OPTIONAL:
            continue
        expected = sampling_value_problem(name, value)
        if expected is not None:
            hint = "None or " if name in _OPTIONAL else ""
            raise ValueError(f"{name} must be {hint}{expected}, got {value!r}")
    if values.get("seed") is not None and values.get("generator") is not None:
        raise ValueError("give either generator or seed, not both (a seed makes a new generator)")


@dataclass(frozen=True)
class SamplingSettings:
    """How the next token is chosen, for every generation path; validated when built.

    Args:
        temperature: ``>= 0``, finite; ``0`` is greedy (any tiny positive value works too).
        top_k: keep the ``k`` most likely tokens (``None``: all).
        top_p: then keep the smallest set with this much probability, in ``(0, 1]`` (``None``: all).
        do_sample: ``False`` is greedy whatever the temperature; ``True`` samples (unless
            ``temperature == 0``); ``None`` (unset) samples iff ``temperature > 0``.  Stored
            resolved: always a ``bool`` after construction.
        seed / generator: the random source (at most one; neither: torch's global RNG).
        eos_token_id: the token that stops a row, or a list of them (any one stops it; Llama 3
            instruct models end a turn with one id and a document with another); ``None``: never
            stop early.  Stored as an ``int``, or a ``tuple`` of two or more.

    ``SamplingSettings(0.7, top_k=50)`` samples; ``SamplingSettings()`` is greedy.
    """

    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    do_sample: Optional[bool] = None
    seed: Optional[int] = None
    generator: Optional[torch.Generator] = field(default=None, repr=False, compare=False)
    eos_token_id: Union[int, Tuple[int, ...], None] = None

    def __post_init__(self):
        validate_sampling_args(self.temperature, self.top_k, self.top_p, seed=self.seed, generator=self.generator,
                               eos_token_id=self.eos_token_id)
        do_sample = self.temperature > 0 if self.do_sample is None else bool(self.do_sample)
        object.__setattr__(self, "do_sample", do_sample)
        if self.eos_token_id is not None:
            object.__setattr__(self, "eos_token_id", _eos_ids(self.eos_token_id))

    @property
    def greedy(self) -> bool:
        """Take the argmax: ``do_sample`` is off or ``temperature == 0``."""
        return not self.do_sample or self.temperature == 0

    def make_generator(self, device=None) -> Optional[torch.Generator]:
        """The random source: ``generator`` if given, else a new one on ``device`` seeded with
        ``seed``, else ``None`` (torch's global RNG).  Call once per generation."""
        if self.generator is not None:
            return self.generator
        if self.seed is not None:
            return torch.Generator(device=device).manual_seed(self.seed)
        return None

    def generate_kwargs(self) -> dict:
        """``do_sample, temperature, top_k, top_p`` as keyword arguments of ``generate`` /
        ``speculative_generate`` (``do_sample`` resolved, so every path reads them alike)."""
        return dict(do_sample=self.do_sample, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the ``k`` largest logits per row, set the rest to ``-inf``. ``(B, V)`` -> ``(B, V)``."""
    if k >= logits.shape[-1]:
        return logits
    _, idx = torch.topk(logits, k, dim=-1)
    out = torch.full_like(logits, float("-inf"))
    return out.scatter(-1, idx, logits.gather(-1, idx))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest most-likely set whose probability reaches ``p``; ``-inf`` elsewhere.

    Sort descending, take the cumulative sum of probabilities; token ``i`` (in sorted order)
    is kept iff the mass of the tokens strictly before it is ``< p``.  So the first token is
    always kept, and we stop right after the mass reaches ``p``.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    remove_sorted = mass_before >= p
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def process_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                   top_p: Optional[float] = None) -> torch.Tensor:
    """Apply temperature, then top-k, then top-p to ``(B, V)`` logits (float32 result).

    ``temperature == 0`` is treated as greedy: only the argmax survives.  Below 1 the row
    maximum is subtracted before dividing (softmax is unchanged by a shift), so the scores are
    at most 0 and a tiny temperature cannot overflow to ``inf``: at ``1e-45`` every token below
    the maximum gets ``-inf`` and the maximum (or the tied maxima) keeps 0 -- the limit of
    ``T -> 0``, not a ``nan``.
    """
    logits = logits.float()
    if temperature == 0:
        return top_k_filter(logits, 1)
    if temperature < 1.0:
        top = logits.amax(dim=-1, keepdim=True)
        # (x - max) / T is <= 0; at the maximum it is 0 / T, which is nan if T rounds to 0 in float32
        logits = torch.where(logits == top, 0.0, (logits - top) / temperature)
    elif temperature != 1.0:
        logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return logits


def sample_next_token(logits: torch.Tensor, do_sample: bool = False, temperature: float = 1.0,
                      top_k: Optional[int] = None, top_p: Optional[float] = None,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pick one token per row from ``(B, V)`` logits; returns ``(B,)`` long.

    ``do_sample=False`` (or ``temperature == 0``) is greedy (argmax); otherwise draw from
    ``softmax(process_logits(...))`` with ``torch.multinomial`` and ``generator``.
    """
    if not do_sample or temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(process_logits(logits, temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def process_logits_rows(logits: torch.Tensor, temperature: Optional[torch.Tensor], top_k: Optional[torch.Tensor],
                        top_p: Optional[torch.Tensor], width: Optional[int] = None) -> torch.Tensor:
    """:func:`process_logits` with settings that differ per row, in one batched pass.

    ``logits`` ``(B, V)``; ``temperature`` ``(B,)`` float, each ``> 0`` (greedy rows take the
    argmax and never come here), or ``None`` for 1 in every row (OpenAI's default: the logits
    as they are, without the seven ``B x V`` passes that decide per row; 11 ms for 32 x 50,257
    on this 2-core CPU); ``top_k`` ``(B,)`` long (``V`` for none); ``top_p`` ``(B,)``
    float (``1.0`` for none); either may be ``None``: no row filters that way.  Returns
    ``(B, V)`` float32 with the filtered tokens at ``-inf``.

    Row ``b`` gets what ``process_logits(logits[b:b+1], temperature[b], top_k[b], top_p[b])``
    gives, and **only row b's own values decide it** (every operation is per row), so a
    request's distribution does not depend on what else is in the batch.  One descending sort
    serves both filters: top-k keeps the first ``k`` sorted entries, top-p then the prefix
    whose mass before each token is ``< p``.  Cost: one sort of ``B x V`` (none when both
    filters are ``None``: temperature alone, as OpenAI's API defaults) and a few ``B x V``
    elementwise passes on the device, no host synchronisation (a serving engine samples every
    step without waiting for the GPU).

    ``width``: first take only each row's ``width`` largest logits (one ``topk``).  On a CPU,
    the rows that decides exactly -- a top-k of at most ``width``, a top-p whose mass is reached
    inside the candidates, no filter -- keep that answer and only the others are sorted whole (a
    host read of which is which).  On another device nothing is read back: pass a width there
    only when every row has a top-k of at most ``width`` (the engine's sampler does).  A full
    sort of a ``64 x 4096`` CPU batch took ~7.5 ms here; a ``topk`` of 64, under one.
    """
    logits = logits.float()
    if temperature is not None:
        t = temperature.float().unsqueeze(-1)  # (B, 1)
        top = logits.amax(dim=-1, keepdim=True)
        # the three branches of process_logits, chosen per row: shift-then-divide below 1, divide above
        cooled = torch.where(logits == top, 0.0, (logits - top) / t)
        logits = torch.where(t < 1, cooled, torch.where(t > 1, logits / t, logits))
    if top_k is None and top_p is None:
        return logits
    if width is None or width >= logits.shape[-1]:
        return _filter_sorted(logits, top_k, top_p)
    out, ok = _filter_top_candidates(logits, top_k, top_p, width)
    if logits.device.type != "cpu":  # no device read: the caller passed a width every row's top-k fits
        return out
    if not bool(ok.all()):  # the rows the candidates do not decide: sorted whole (a host read)
        bad = (~ok).nonzero().squeeze(-1)
        out[bad] = _filter_sorted(logits[bad], None if top_k is None else top_k[bad],
                                  None if top_p is None else top_p[bad])
    return out


def _filter_sorted(logits: torch.Tensor, top_k: Optional[torch.Tensor], top_p: Optional[torch.Tensor]) -> torch.Tensor:
    """Top-k then top-p of tempered ``(B, V)`` logits through one descending sort of each row."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    if top_k is not None:
        rank = torch.arange(logits.shape[-1], device=logits.device)
        sorted_logits = sorted_logits.masked_fill(rank >= top_k.unsqueeze(-1), float("-inf"))
    if top_p is not None:
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        p = torch.where(top_p >= 1, float("inf"), top_p.float()).unsqueeze(-1)  # p >= 1 keeps all, as process_logits
        sorted_logits = sorted_logits.masked_fill(mass_before >= p, float("-inf"))
    return sorted_logits.scatter(-1, order, sorted_logits)


def _filter_top_candidates(logits: torch.Tensor, top_k: Optional[torch.Tensor], top_p: Optional[torch.Tensor],
                           width: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`process_logits_rows`' filters over each row's ``width`` largest (already tempered)
    logits only: ``(B, V)`` results and a ``(B,)`` mask of the rows where that is what the full
    sort gives.  A row is decided by its candidates when its top-k is at most ``width``, or when
    top-p alone reaches its mass ``p`` inside them (measured against the whole distribution, as
    the full path's softmax does), or when it has no filter at all; a wider top-k is not."""
    V = logits.shape[-1]
    has_k = top_k < V if top_k is not None else torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    ok = has_k & (top_k <= width) if top_k is not None else has_k.clone()
    free = ~has_k if top_p is None else ~has_k & (top_p >= 1)  # no filter at all: every logit stays
    if top_p is not None:
        open_rows = (top_p < 1) & ~has_k  # top-p alone: its cut must fall inside the candidates
        full_lse = torch.logsumexp(logits, -1, keepdim=True)
        p = torch.where(top_p >= 1, float("inf"), top_p.float()).unsqueeze(-1)
        # no candidate holds more than the largest probability, so a flat row cannot reach p
        # within them: skip the selection when no row could be decided by it
        reach = width * torch.exp(logits.amax(-1) - full_lse[:, 0]) >= p[:, 0]
        if logits.device.type == "cpu" and not bool((ok | (open_rows & reach)).any()):
            return torch.where(free.unsqueeze(-1), logits, torch.full_like(logits, float("-inf"))), free
    vals, idx = torch.topk(logits, width, dim=-1)  # (B, width), descending
    if top_k is not None:
        vals = vals.masked_fill(torch.arange(width, device=logits.device) >= top_k.unsqueeze(-1), float("-inf"))
    if top_p is not None:
        lse = torch.where(has_k.unsqueeze(-1), torch.logsumexp(vals, -1, keepdim=True), full_lse)
        probs = torch.exp(vals - lse)
        mass = torch.cumsum(probs, dim=-1)
        ok |= open_rows & (mass[:, -1] >= p[:, 0])
        vals = vals.masked_fill(mass - probs >= p, float("-inf"))
    out = torch.full_like(logits, float("-inf")).scatter_(-1, idx, vals)
    return torch.where(free.unsqueeze(-1), logits, out), ok | free
