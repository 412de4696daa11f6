"""A request of the serving engine: its prompt, its own sampling settings, its tokens so far.

One object follows a request through its life::

    WAITING --(scheduled)--> RUNNING --(stop token, max_tokens, abort)--> FINISHED
                 ^                |
                 +--(preempted)---+   blocks ran out: its memory is freed and it is recomputed
                                      later from prompt + generated tokens; nothing is lost

``num_computed`` counts the tokens whose keys and values are in the paged pool; the engine runs
the next ``all_ids[num_computed:]`` (a prompt chunk, or the one newest token when decoding) and,
when that reaches the end of the known tokens, samples one more.
"""

from __future__ import annotations

import enum
import functools
import operator
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from ..sampling import SamplingSettings


class Status(enum.Enum):
    """Where a request is: waiting for memory/budget, running in the batch, or finished."""
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings (the OpenAI completion fields).

    ``max_tokens`` new tokens at most; ``temperature`` (0 = greedy), ``top_k``, ``top_p``, ``seed``
    as in :class:`~transformer.sampling.SamplingSettings` (validated by the same one validator);
    ``stop_token_ids`` end the request when generated (the stop token is kept in the output,
    as ``generate()`` keeps EOS; empty: the engine's EOS).  ``ignore_eos`` runs to
    ``max_tokens`` whatever is generated (benchmarks).  Stop *strings* are text: the server
    checks them.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {self.max_tokens!r}")
        object.__setattr__(self, "stop_token_ids", tuple(operator.index(t) for t in self.stop_token_ids))
        self.settings  # validates temperature/top_k/top_p/seed with the project's one validator

    @functools.cached_property
    def settings(self) -> SamplingSettings:
        """These settings as the :class:`SamplingSettings` every generation path reads."""
        return SamplingSettings(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed)


@dataclass
class Request:
    """One request's state inside the engine (see the module docstring)."""

    request_id: str
    prompt_ids: List[int]
    params: SamplingParams
    output_ids: List[int] = field(default_factory=list)
    num_computed: int = 0
    status: Status = Status.WAITING
    finish_reason: Optional[str] = None  # "stop", "length" or "abort"
    seed: int = 0  # keys its random stream: params.seed, else drawn from torch's global RNG on arrival
    preemptions: int = 0
    num_pending: int = 0  # tokens sampled on the device whose values the host has not read yet
    pending_row: int = -1  # its row in the last launched step's sampled tokens (async scheduling)

    @property
    def all_ids(self) -> List[int]:
        """Prompt then generated tokens: what the pool must hold before the next sample."""
        return self.prompt_ids + self.output_ids

    def tokens(self, start: int, end: int) -> List[int]:
        """``all_ids[start:end]`` without building ``all_ids`` (a step asks for its chunk only)."""
        P = len(self.prompt_ids)
        if end <= P:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:P] + self.output_ids[max(start - P, 0):end - P]

    def token(self, i: int) -> Optional[int]:
        """``all_ids[i]``: O(1).  ``None`` for a pending token (sampled, value still on the device)."""
        P, O = len(self.prompt_ids), len(self.output_ids)
        return self.prompt_ids[i] if i < P else self.output_ids[i - P] if i < P + O else None

    @property
    def num_tokens(self) -> int:
        """Prompt, generated and pending tokens: what the pool must hold before the next sample."""
        return len(self.prompt_ids) + len(self.output_ids) + self.num_pending

    @property
    def last_pending(self) -> bool:
        """Its last token is already sampled (pending): nothing is left to schedule for it."""
        return self.num_pending > 0 and len(self.output_ids) + self.num_pending >= self.params.max_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass(frozen=True)
class RequestOutput:
    """What one engine step produced for one request: ``new_token_ids`` (zero or one token; zero
    while its prompt is still being prefilled in chunks), and whether it finished and why."""

    request_id: str
    new_token_ids: List[int]
    finished: bool
    finish_reason: Optional[str] = None
